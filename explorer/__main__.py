"""`python -m explorer run EXPERIMENT.yaml` and `python -m explorer replay RESULT.json`: see
`python -m explorer --help` and README's "Reproducible runs"."""
from __future__ import annotations

import sys

from .experiments.cli import main

sys.exit(main())
