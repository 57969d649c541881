"""The command line of `python -m explorer`."""
from __future__ import annotations

import argparse
import logging

from ..runtime.loading import route_library_logs
from ..web.server import add_model_arguments
from .replay import replay
from .run import run

DESCRIPTION = """Run experiment files and replay their results, in-process (no server needed).

  run EXPERIMENT.yaml     run the file's named requests; write OUT/<experiment>/<tag>/ with
                          result.json (requests, answers, provenance), config.yaml (the resolved
                          configuration) and a PNG and SVG figure per request that has one
  replay RESULT.json      re-run every request of a result (or of a viewer's JSON export) and
                          check each answer against it within the documented precision
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m explorer", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True, metavar="{run,replay}")
    r = commands.add_parser("run", help="run an experiment file",
                            description="Run an experiment file's requests in-process. Exit status: 0 all "
                                        "succeeded, 1 some failed (the others still ran), 2 the file is invalid.")
    r.add_argument("experiment", help="the experiment's YAML file (see examples/experiments/)")
    r.add_argument("--out", default="runs", help="directory for the results (default: %(default)s)")
    r.add_argument("--tag", help="the run's folder name under OUT/<experiment>/ (default: the UTC time)")
    add_model_arguments(r)
    r.set_defaults(handler=run)
    b = commands.add_parser("replay", help="re-run a result and check its answers",
                            description="Re-run every request of RESULT.json and compare the answers. Exit "
                                        "status: 0 all match, 1 a mismatch, 2 it could not run.")
    b.add_argument("result", help="an experiment's result.json or a viewer's JSON export")
    where = b.add_mutually_exclusive_group()
    where.add_argument("--against", metavar="URL", help="a running server (e.g. http://127.0.0.1:5001) "
                                                        "instead of in-process")
    where.add_argument("--model", action="append", help="replay on this model (name or directory) instead "
                                                        "of the one the provenance names; repeat for several")
    b.add_argument("--device", default="auto", help="where an in-process replay computes (default auto)")
    b.add_argument("--json", metavar="FILE", help="also write the per-request report as JSON")
    b.set_defaults(handler=replay)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    route_library_logs()
    return args.handler(args)
