"""Time from `python app.py` (default --model gpt2, empty cache) to its error when the Hugging Face
hub is unreachable (HF_ENDPOINT at a closed local port), before and after issue 16.

    .venv/bin/python -m bench.offline_start [--before DIR] [--runs N]

`--before DIR`: a copy of an older tree to compare with (e.g. `git archive 542eb87 | tar -x -C DIR`),
run with this interpreter, interleaved with this tree's runs. Prints, per run: exit status, total
seconds, seconds after the "Loading" log line (imports come before it and depend on the
machine's load), stderr lines, lines repeating an earlier line's message, and tracebacks.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")


def start_once(tree: Path, endpoint: str) -> dict[str, float | int]:
    with tempfile.TemporaryDirectory() as hf_home:
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env.update(HF_HOME=hf_home, HF_ENDPOINT=endpoint, PYTHONUNBUFFERED="1")
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "app.py", "--device", "cpu", "--port", "0"], cwd=tree, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        lines, loading = [], None
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if loading is None and "Loading" in line:
                loading = time.monotonic()
        status = proc.wait()
        end = time.monotonic()
    messages = [PREFIX.sub("", line) for line in lines if line.strip()]
    return {"status": status, "total": end - start, "after_loading": end - (loading or start),
            "lines": len(messages), "repeated": len(messages) - len(set(messages)),
            "tracebacks": sum("Traceback" in line for line in lines)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="an older tree to compare with")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    closed = socket.socket()  # bound, never listening: connections are refused at once
    closed.bind(("127.0.0.1", 0))
    endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    trees = ([("before", args.before)] if args.before else []) + [("after", ROOT)]
    results: dict[str, list[dict[str, float | int]]] = {name: [] for name, _ in trees}
    for _ in range(args.runs):  # interleaved: the machine's load drifts
        for name, tree in trees:
            r = start_once(tree, endpoint)
            results[name].append(r)
            print(f"{name:<7} exit {r['status']}  total {r['total']:5.1f} s  after 'Loading' "
                  f"{r['after_loading']:5.1f} s  stderr lines {r['lines']:>3}  repeated {r['repeated']:>3}  "
                  f"tracebacks {r['tracebacks']}", flush=True)
    closed.close()
    if args.before:
        best = {name: min(r["after_loading"] for r in runs) for name, runs in results.items()}
        print(f"\nafter 'Loading', best of {args.runs}: before {best['before']:.1f} s, after {best['after']:.1f} s "
              f"({best['before'] / best['after']:.0f}x faster)")


if __name__ == "__main__":
    main()
