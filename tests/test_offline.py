"""Start-up without internet (issue 16): `python app.py` with the hub unreachable fails within
seconds with one paragraph, each log line once; a cached hub model starts without touching the
network; a local directory is reported as `"weights": "local"` with its path."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")  # our log format's time and level


def child_env(hf_home: Path, endpoint: str) -> dict[str, str]:
    """The environment of a user with no cached models and the given hub endpoint. CI exports
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1, which would skip the path under test."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT=endpoint, PYTHONUNBUFFERED="1", EXPLORER_DEVICE="cpu")
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_until_exit(proc: subprocess.Popen, marker: str, limit: float) -> tuple[list[str], float | None]:
    """stderr lines until the process exits (or `limit` s pass), and when `marker` was seen."""
    lines: list[str] = []
    seen = None
    deadline = time.monotonic() + limit
    for line in proc.stderr:
        lines.append(line.rstrip("\n"))
        if seen is None and marker in line:
            seen = time.monotonic()
        if time.monotonic() > deadline:
            break
    return lines, seen


@pytest.mark.slow  # starts app.py in a subprocess
def test_unreachable_hub_fails_fast_and_says_it_once(tmp_path):
    closed = socket.socket()  # bound, never listening: every connection is refused
    closed.bind(("127.0.0.1", 0))
    endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "app.py", "--model", "gpt2", "--port", str(free_port())],
                            cwd=ROOT, env=child_env(tmp_path / "hf", endpoint), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines, loading = read_until_exit(proc, "Loading gpt2", limit=120)
        status = proc.wait(timeout=10)
    finally:
        proc.kill()
        closed.close()
    ended = time.monotonic()
    stderr = "\n".join(lines)
    assert status == 1, stderr
    assert loading is not None, stderr
    # Imports before the "Loading" line depend on the machine's load; what follows is ours.
    assert ended - loading <= 10, f"{ended - loading:.1f} s from 'Loading' to exit"
    print(f"\nunreachable hub: exit 1 after {ended - start:.1f} s, {ended - loading:.1f} s after 'Loading'")
    assert "Could not load the model 'gpt2'" in stderr and "--random-weights" in stderr
    assert endpoint in stderr and "not in the local Hugging Face cache" in stderr
    assert "Traceback" not in stderr and "Retry" not in stderr
    messages = [PREFIX.sub("", line) for line in lines if line.strip()]
    assert len(messages) == len(set(messages)), f"a line printed twice:\n{stderr}"


def get_json(url: str, wait: float = 30) -> dict:
    """GET `url`, retrying while the server (which logs "Ready" just before listening) starts."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                return json.load(resp)
        except urllib.error.URLError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def fake_hub_cache(hf_home: Path, repo: str, files: Path) -> None:
    """`files` laid out as huggingface_hub caches a download of `repo` (refs/main -> snapshot)."""
    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(files, folder / "snapshots" / commit)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


@pytest.mark.slow  # starts app.py in a subprocess
def test_cached_hub_model_starts_without_the_network(tmp_path, tiny_dir):
    repo = "explorer-test/tiny-gpt2"
    fake_hub_cache(tmp_path / "hf", repo, tiny_dir)
    hub = socket.socket()  # a listening hub that never answers: any request would be seen here
    hub.bind(("127.0.0.1", 0))
    hub.listen(8)
    hub.setblocking(False)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "app.py", "--model", repo, "--port", str(port)], cwd=ROOT,
                            env=child_env(tmp_path / "hf", f"http://127.0.0.1:{hub.getsockname()[1]}"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if "Ready" in line or len(lines) > 200:
                break
        stderr = "\n".join(lines)
        assert any("Ready" in line for line in lines), stderr
        assert sum("local Hugging Face cache: loading it offline" in line for line in lines) == 1, stderr
        info = get_json(f"http://127.0.0.1:{port}/model")
        assert (info["name"], info["weights"], info["path"]) == (repo, "pretrained", None)
        with pytest.raises(BlockingIOError):
            hub.accept()  # nothing connected to the hub
    finally:
        proc.kill()
        proc.wait(timeout=30)
        hub.close()


def test_local_directory_is_reported_as_local(client, tiny_dir):
    info = client.get("/model").get_json()
    assert info["weights"] == "local"
    assert info["path"] == str(Path(tiny_dir).resolve())


def test_hub_and_random_models_report_no_path(tiny_model):
    from dataclasses import replace

    for weights in ("pretrained", "random"):
        info = replace(tiny_model, weights=weights, path=None).info()
        assert info["weights"] == weights and info["path"] is None
