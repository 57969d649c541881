"""A model replica whose worker the test can make stuck (tests/test_cluster.py: Ray Serve replaces it).
Only the tests deploy it; the production replica has no such method."""
from __future__ import annotations

import time

from explorer.cluster.serve import ModelServer


class StuckableServer(ModelServer):
    def stick(self, seconds: float) -> None:
        """Queue one call that holds the model worker for `seconds`: what a hung forward pass looks
        like to the health check (the worker runs nothing else meanwhile)."""
        self.app.extensions["explorer"].worker.submit(lambda: time.sleep(seconds), bounded=False)
