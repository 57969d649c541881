"""Long requests against `python app.py --random-weights` (admission by cost, cancel, disconnect).

    python -m bench.long_bench [--quick] [--markdown FILE]

Starts the server as users do (a subprocess on a free loopback port, default flags: --work-mb
2048, --cache-mb 1024), warms it (one 1000-token /score, so the throughput that admission and
chunk sizes read is measured on this machine, and one /lens so its one-time vocabulary decode is
not billed to a case), then runs each case of issue 27 on the GPT-2-small shape and prints one
table row per case. Token counts include BOS. Prompt pairs differ at their first token (position
1), so every cell of a sweep runs.

Per case: the outcome (HTTP status, the first 100 characters of an error), wall time, the peak
resident size of the server above its level right before the case (VmRSS sampled every 50 ms; the
kernel's VmHWM, reset at the case's start, in parentheses), the cache size after it, the latency
of an interactive request made during it, and the time from DELETE (or a disconnect) to the work
stopping. Every number comes from this one run.
"""
from __future__ import annotations

import argparse
import http.client
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from bench.bench import ROOT, Texts, free_port, proc_kb
from explorer.runtime.loading import gpt2_tokenizer

HOST = "127.0.0.1"
ANSWER, DISTRACTOR = " the", " a"
FACT = " The Eiffel Tower is in the city of"
TERMINAL = ("done", "error", "cancelled")


# --- the server -------------------------------------------------------------------------------

class Server:
    """`python app.py --random-weights` on a free loopback port; its log goes to a temp file."""

    def __init__(self) -> None:
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="long-bench-server-", suffix=".log", delete=False)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--random-weights", "--host", HOST,
                                      "--port", str(self.port)],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            if time.perf_counter() - started > 300:
                raise RuntimeError("app.py did not answer /health within 300 s")
            try:
                if self.request("GET", "/health", timeout=5)[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        self.startup_s = time.perf_counter() - started

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 60) -> tuple[int, Any, float]:
        """(status, parsed JSON body, seconds); every request has a timeout."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        start = time.perf_counter()
        try:
            if body is None:
                conn.request(method, path)
            else:
                conn.request(method, path, orjson.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        seconds = time.perf_counter() - start
        try:
            parsed = orjson.loads(data) if data else None
        except orjson.JSONDecodeError:
            parsed = {"error": f"non-JSON body: {data[:100]!r}"}
        return resp.status, parsed, seconds

    def post(self, path: str, body: dict, timeout: float = 60) -> tuple[int, Any, float]:
        return self.request("POST", path, body, timeout)

    def cache_mib(self) -> float:
        return self.request("GET", "/health", timeout=10)[1]["cache"]["bytes"] / 2**20

    def cpu_seconds(self) -> float:
        """utime + stime of the whole server process (all threads)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_text(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


class PeakRSS:
    """The server's peak resident size above its level at entry: VmRSS sampled every 50 ms, and
    VmHWM after resetting it at entry (`/proc/<pid>/clear_refs` 5)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __enter__(self) -> "PeakRSS":
        self.idle_kb = self.peak_kb = proc_kb(self.pid, "VmRSS")
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self.hwm_ok = True
        except OSError:
            self.hwm_ok = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak_kb = max(self.peak_kb, proc_kb(self.pid, "VmRSS"))
            except (OSError, KeyError):
                return

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.peak_kb = max(self.peak_kb, proc_kb(self.pid, "VmRSS"))
            self.hwm_kb = proc_kb(self.pid, "VmHWM") if self.hwm_ok else None
        except (OSError, KeyError):
            self.hwm_kb = None

    def text(self) -> str:
        sampled = round((self.peak_kb - self.idle_kb) / 1024)
        if self.hwm_kb is None:
            return f"{sampled}"
        return f"{sampled} ({round((self.hwm_kb - self.idle_kb) / 1024)})"


# --- texts ------------------------------------------------------------------------------------

class Prompts:
    """Texts of exact token counts (BOS included), never sent before in this run."""

    def __init__(self) -> None:
        self.tok = gpt2_tokenizer()
        self.texts = Texts(self.tok)

    def count(self, text: str) -> int:
        return 1 + len(self.tok.encode(text, add_special_tokens=False))

    def text(self, n: int) -> str:
        text = self.texts.make(n)
        assert self.count(text) == n
        return text

    def pair(self, n: int) -> tuple[str, str]:
        """Two prompts of n tokens differing only at position 1 ('Alice' / 'Bob')."""
        while True:
            rest = self.texts.make(n - 1)  # n - 2 tokens
            rest_ids = self.tok.encode(rest, add_special_tokens=False)
            clean, corrupt = "Alice" + rest, "Bob" + rest
            ids = [self.tok.encode(t, add_special_tokens=False) for t in (clean, corrupt)]
            if all(i[1:] == rest_ids and len(i) == n - 1 for i in ids):
                return clean, corrupt

    def fact(self, n: int) -> str:
        """A text of n tokens ending with the Eiffel Tower prompt (its subject about 9 tokens from the end)."""
        while True:
            text = self.texts.make(n - 10) + FACT
            if self.count(text) == n:
                return text


def patch_body(clean: str, corrupt: str, site: str, run_async: bool | None = None) -> dict:
    body = {"clean": clean, "corrupt": corrupt, "answer": ANSWER, "distractor": DISTRACTOR, "site": site}
    if run_async is not None:
        body["async"] = run_async
    return body


def error_of(status: int, data: Any) -> str:
    msg = data.get("error", "") if isinstance(data, dict) else ""
    return f"{status}: {msg[:100]}" if msg else str(status)


def read_response(sock: socket.socket, timeout: float) -> bytes:
    """A whole HTTP response (head and Content-Length body) if it starts within `timeout` s, else b""."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                if len(body) >= length:
                    return data
            sock.settimeout(10.0)  # the rest of a response that has started
    except socket.timeout:
        return data


def descending(start: int, stop: int, factor: float = 0.9) -> list[int]:
    out, n = [], float(start)
    while n >= stop:
        if not out or int(n) < out[-1]:
            out.append(int(n))
        n *= factor
    return out


# --- jobs -------------------------------------------------------------------------------------

def job_status(server: Server, job: str) -> dict:
    status, data, _ = server.request("GET", f"/jobs/{job}", timeout=30)
    return data if status == 200 else {"status": f"GET {status}"}


def cancel(server: Server, job: str, limit: float = 120) -> tuple[float, str, int]:
    """DELETE the job, then poll it every 20 ms: (seconds until terminal, final status, DELETE's HTTP status)."""
    start = time.perf_counter()
    status, _, _ = server.request("DELETE", f"/jobs/{job}", timeout=30)
    while True:
        state = job_status(server, job)["status"]
        elapsed = time.perf_counter() - start
        if state not in ("queued", "running", "cancelling") or elapsed > limit:
            return elapsed, state, status
        time.sleep(0.02)


def wait_job(server: Server, job: str, limit: float) -> tuple[str, dict]:
    """Poll a job until it ends or `limit` s pass: ("done"/"error"/... or "timeout", last state)."""
    start = time.perf_counter()
    while True:
        state = job_status(server, job)
        if state["status"] in TERMINAL:
            return state["status"], state
        if time.perf_counter() - start > limit:
            return "timeout", state
        time.sleep(0.25)


def wait_running(server: Server, job: str, limit: float = 30) -> dict:
    start = time.perf_counter()
    while True:
        state = job_status(server, job)
        if state["status"] != "queued" or time.perf_counter() - start > limit:
            return state
        time.sleep(0.05)


# --- the cases --------------------------------------------------------------------------------

class Bench:
    def __init__(self, server: Server, prompts: Prompts, quick: bool) -> None:
        self.s, self.p, self.quick = server, prompts, quick
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.async_len: int | None = None

    def row(self, case: str, outcome: str, wall: float, mem: PeakRSS | None, interactive: str = "-",
            stop: str = "-") -> None:
        r = {"case": case, "outcome": outcome, "wall": f"{wall:.2f}",
             "before": f"{mem.idle_kb / 1024:.0f}" if mem else "-", "rss": mem.text() if mem else "-",
             "cache": f"{self.s.cache_mib():.0f}", "interactive": interactive, "stop": stop}
        self.rows.append(r)
        print(" | ".join(r.values()), file=sys.stderr, flush=True)

    def simple(self, case: str, path: str, body: dict, timeout: float = 60) -> tuple[int, Any]:
        """One request, one row."""
        with PeakRSS(self.s.pid) as mem:
            status, data, seconds = self.s.post(path, body, timeout)
        self.row(case, error_of(status, data), seconds, mem)
        return status, data

    def case1(self) -> None:
        for noise in (1e300, 3.4e38):
            self.simple(f"1 causal_trace Eiffel, samples 2, noise {noise:g}", "/causal_trace",
                        {"text": "The Eiffel Tower is in the city of", "subject": "Eiffel Tower", "samples": 2,
                         "noise": noise})

    def case2(self) -> None:
        clean, corrupt = self.p.pair(999)
        self.case2_patch = patch_body(clean, corrupt, "resid_pre")
        self.simple("2 patch sync, 999 tok, resid_pre", "/patch", self.case2_patch)
        self.simple("2 causal_trace sync, 1000 tok, 10 samples, resid", "/causal_trace",
                    {"text": self.p.fact(1000), "subject": "Eiffel Tower", "samples": 10, "kind": "resid"})

    def case3(self) -> None:
        """The largest heads_by_position sweep admitted synchronously; the client leaves after 3 s."""
        idle0 = self.s.cpu_seconds()
        time.sleep(1.0)
        idle_rate = self.s.cpu_seconds() - idle0  # CPU s per s of the idle server
        refused = ""
        with PeakRSS(self.s.pid) as mem:
            t0 = time.perf_counter()
            for n in descending(128, 3):
                clean, corrupt = self.p.pair(n)
                body = orjson.dumps(patch_body(clean, corrupt, "heads_by_position"))
                sock = socket.create_connection((HOST, self.s.port), timeout=10)
                sock.sendall(f"POST /patch HTTP/1.1\r\nHost: {HOST}:{self.s.port}\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                sent, cpu_sent = time.perf_counter(), self.s.cpu_seconds()
                head = read_response(sock, 3.0)
                if head:  # answered within 3 s: refused (400) or already done
                    status = int(head.split()[1])
                    sock.close()
                    gone, cpu_gone = time.perf_counter(), self.s.cpu_seconds()
                    if status == 400:
                        body = orjson.loads(head.partition(b"\r\n\r\n")[2] or b"{}")
                        refused = f"{n} tok -> {error_of(status, body)}"
                        continue
                    self.notes.append(f"case 3: {n}-token heads_by_position answered {status} within 3 s; "
                                      "the disconnect measurement below is of an idle server")
                    break
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
                gone, cpu_gone = time.perf_counter(), self.s.cpu_seconds()
                break
            else:
                raise RuntimeError("no heads_by_position length was admitted synchronously")
            # CPU after the disconnect: every 100 ms for 10 s.
            cpu0 = last = self.s.cpu_seconds()
            stopped_at, quiet_since, samples = None, None, []
            while time.perf_counter() - gone < 10.0:
                time.sleep(0.1)
                now_cpu, now = self.s.cpu_seconds(), time.perf_counter() - gone
                samples.append((now, now_cpu - last))
                if now_cpu - last <= 0.01 + idle_rate * 0.1:  # at most one clock tick above the idle rate
                    quiet_since = quiet_since if quiet_since is not None else now - 0.1
                    if stopped_at is None and now - quiet_since >= 0.5:
                        stopped_at = quiet_since
                else:
                    quiet_since = None
                last = now_cpu
            burned = self.s.cpu_seconds() - cpu0
        stop = (f"CPU idle {stopped_at:.2f} s after disconnect" if stopped_at is not None
                else "CPU never idle for 0.5 s within 10 s") + (
                f"; {burned:.2f} CPU s in the 10 s after (vs {cpu_gone - cpu_sent:.2f} CPU s in the "
                f"{gone - sent:.1f} s before)")
        self.row(f"3 patch sync {n} tok heads_by_position (largest admitted), client gone at "
                 f"{gone - sent:.1f} s", "admitted (no answer: disconnected)", gone - t0, mem, stop=stop)
        self.notes.append(f"case 3: largest synchronous heads_by_position admitted: {n} tokens; the next longer "
                          f"refused ({refused}). Idle server CPU before: {idle_rate:.3f} CPU s/s.")

    def start_async_patch(self, start: int) -> tuple[int, str, str]:
        """The longest heads_by_position /patch from `start` tokens down admitted as a job:
        (tokens, job id, the refusal of the next longer one)."""
        refused = ""
        for n in descending(start, 3):
            clean, corrupt = self.p.pair(n)
            status, data, _ = self.s.post("/patch", patch_body(clean, corrupt, "heads_by_position", True), 30)
            if status == 202:
                return n, data["job"], refused
            refused = f"{n} tok -> {error_of(status, data)}"
            if status != 400:
                raise RuntimeError(f"async /patch {n} tokens: {refused}")
        raise RuntimeError("no heads_by_position /patch was admitted as a job")

    def case4(self) -> None:
        with PeakRSS(self.s.pid) as mem:
            _, _, idle_lens = self.s.post("/lens", {"text": self.p.text(10)}, 60)
        self.row("4a lens 10 tok, idle server (cold text)", "200", idle_lens, mem)
        with PeakRSS(self.s.pid) as mem:
            t0 = time.perf_counter()
            n, job, refused = self.start_async_patch(500)
            self.async_len = n
            wait_running(self.s, job)
            time.sleep(1.0 if self.quick else 2.0)
            status, _, busy_lens = self.s.post("/lens", {"text": self.p.text(10)}, 130)
            progress = job_status(self.s, job).get("progress")
            stop_s, final, _ = cancel(self.s, job)
            wall = time.perf_counter() - t0
        self.row(f"4b patch async {n} tok heads_by_position (500 refused), lens during it, DELETE",
                 f"202, then {final}", wall, mem,
                 interactive=f"lens {status} in {busy_lens:.2f} s (idle {idle_lens:.2f} s)",
                 stop=f"{stop_s:.2f} s to {final} (progress was {progress})")
        self.notes.append(f"case 4: longest heads_by_position /patch admitted as a job: {n} tokens "
                          f"(next longer: {refused}).")

    def case5(self) -> None:
        text = self.p.fact(1000)
        body = {"text": text, "subject": "Eiffel Tower", "kind": "mlp", "window": 12, "async": True}
        self.simple("5a causal_trace async 1000 tok, 50 samples, mlp, window 12", "/causal_trace",
                    {**body, "samples": 50})
        refused = ""
        with PeakRSS(self.s.pid) as mem:
            t0 = time.perf_counter()
            for samples in range(49, 0, -1):
                status, data, _ = self.s.post("/causal_trace", {**body, "samples": samples}, 30)
                if status == 202:
                    break
                refused = f"{samples} samples -> {error_of(status, data)}"
            else:
                samples = 0
            if samples:
                job = data["job"]
                time.sleep(3.0)
                progress = job_status(self.s, job).get("progress")
                stop_s, final, _ = cancel(self.s, job)
                outcome, stop = f"202, then {final}", f"{stop_s:.2f} s to {final} (progress was {progress})"
            else:
                outcome, stop = "every sample count refused", "-"
            wall = time.perf_counter() - t0
        self.row(f"5b causal_trace async 1000 tok, {samples} samples (largest admitted), mlp, DELETE at 3 s",
                 outcome, wall, mem, stop=stop)
        self.notes.append(f"case 5: subject 'Eiffel Tower' at positions ~991-994 of 1000; largest sample count "
                          f"admitted as a job: {samples} (next: {refused}).")

    def case6(self) -> None:
        with PeakRSS(self.s.pid) as mem:
            t0 = time.perf_counter()
            n, job, _ = self.start_async_patch(self.async_len or 500)
            wait_running(self.s, job)
            time.sleep(1.0)
            status, data, seconds = self.s.post("/score", {"text": self.p.text(12)}, 130)
            still = job_status(self.s, job)["status"]
            stop_s, final, _ = cancel(self.s, job)
            wall = time.perf_counter() - t0
        self.row(f"6 score 12 tok sync while a {n}-tok heads_by_position job runs", error_of(status, data), wall,
                 mem, interactive=f"score {status} in {seconds:.2f} s (job {still} meanwhile)",
                 stop=f"{stop_s:.2f} s to {final}")

    def long_job(self, case: str, path: str, body: dict, limit: float) -> None:
        """A request sent as a job: waited for up to `limit` s, then cancelled; a refusal is its row."""
        with PeakRSS(self.s.pid) as mem:
            t0 = time.perf_counter()
            status, data, seconds = self.s.post(path, {**body, "async": True}, 60)
            stop = "-"
            if status == 202:
                job = data["job"]
                final, state = wait_job(self.s, job, limit)
                if final == "timeout":
                    stop_s, final, _ = cancel(self.s, job)
                    stop = f"{stop_s:.2f} s to {final} (progress was {state.get('progress')})"
                    outcome = f"202, still {state['status']} after {limit:.0f} s: cancelled"
                else:
                    outcome = f"202, then {final}" + (f": {state.get('error', '')[:100]}" if final == "error" else "")
            else:
                outcome = error_of(status, data)
            wall = time.perf_counter() - t0
        self.row(case, outcome, wall, mem, stop=stop)

    def case7(self) -> None:
        limit = 30.0 if self.quick else 60.0
        clean, corrupt = self.p.pair(1000)
        self.long_job("7a attribution_patch async 1000 tok, heads, compare", "/attribution_patch",
                      {**patch_body(clean, corrupt, "heads"), "compare": True}, limit)
        refs = [self.p.text(1000) for _ in range(64)]
        short = "When Mary and John went to the store, John gave a drink to"
        self.long_job("7b ablate async, 64 reference texts x 1000 tok (text: 16 tok), heads, mean", "/ablate",
                      {"text": short, "answer": " Mary", "distractor": " John", "reference_texts": refs}, limit)
        self.simple("7c score sync 4 x 1000 tok", "/score", {"texts": [self.p.text(1000) for _ in range(4)]}, 300)
        self.long_job("7d the case-2 patch async, 999 tok, resid_pre", "/patch", self.case2_patch, limit)


def report(bench: Bench, server: Server, warm: str, total_s: float, quick: bool) -> str:
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; shared and "
        f"noisy. Server: `python app.py --random-weights` (GPT-2-small shape, float32, CPU, default flags: "
        f"--work-mb 2048, --cache-mb 1024), started in {server.startup_s:.1f} s. {warm}"
        + (" `--quick`." if quick else ""),
        "",
        "Token counts include BOS. Prompt pairs differ at position 1 ('Alice' / 'Bob' + the same text), "
        f"answer '{ANSWER}', distractor '{DISTRACTOR}'. Peak RSS: the server's VmRSS sampled every 50 ms "
        "above its level right before the case (in parentheses: VmHWM reset at the case's start, minus that "
        "level), MiB. Cache: `/health` cache bytes after the case, MiB. Stop: from DELETE (or the client's "
        "disconnect) to the job's terminal state (or the server's CPU going idle).",
        "",
        "| case | outcome | wall s | RSS before MiB | peak RSS above it MiB | cache MiB | interactive request | stop |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in bench.rows:
        cells = [str(v).replace("|", "\\|").replace("\n", " ") for v in r.values()]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"- {n}" for n in bench.notes]
    lines.append(f"- Whole run (server start to stop): {total_s:.0f} s.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter waits (every case still runs)")
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    parser.add_argument("--rounds", type=int, default=1, help=(
        "run every case this many times (new texts each time): the server's resident size after each "
        "round shows whether the memory one round used is reused by the next or added to it"))
    args = parser.parse_args()
    started = time.perf_counter()
    prompts = Prompts()
    server = Server()
    rss = {"after start": proc_kb(server.pid, "VmRSS") / 1024}
    try:
        # Warm up: one long forward pass measures the throughput admission reads; /lens's first call
        # decodes the vocabulary once.
        status, data, warm_s = server.post("/score", {"text": prompts.text(1000)}, 300)
        assert status == 200, error_of(status, data)
        assert server.post("/lens", {"text": prompts.text(10)}, 120)[0] == 200
        status, data, _ = server.post("/patch", patch_body(*prompts.pair(1000), "heads_by_position"), 30)
        rate = error_of(status, data)
        warm = (f"Warm-up: one 1000-token /score ({warm_s:.1f} s) and one /lens; a probe refusal then read: "
                f"\"{rate[5:]}\".")
        rss["after warm-up"] = proc_kb(server.pid, "VmRSS") / 1024
        bench = Bench(server, prompts, args.quick)
        for round_ in range(1, args.rounds + 1):
            for case in (bench.case1, bench.case2, bench.case3, bench.case4, bench.case5, bench.case6, bench.case7):
                case()
            time.sleep(2.0)
            rss[f"after round {round_} (idle 2 s)" if args.rounds > 1 else "at the end (idle 2 s)"] = \
                proc_kb(server.pid, "VmRSS") / 1024
        rss["highest sampled during the cases"] = max(
            [float(r["before"]) + float(r["rss"].split()[0]) for r in bench.rows if r["before"] != "-"])
        cache_end = server.cache_mib()
        log = server.log_text()
    finally:
        server.stop()
    total = time.perf_counter() - started
    errors = [line for line in log.splitlines() if "Traceback" in line or " ERROR " in line or '" 500 ' in line]
    if errors:
        bench.notes.append(f"server log: {len(errors)} error line(s), first: {errors[0][:200]}")
    else:
        bench.notes.append("server log: no tracebacks or errors.")
    bench.notes.append("server RSS: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in rss.items())
                       + f"; cache at the end {cache_end:.0f} MiB.")
    text = report(bench, server, warm, total, args.quick)
    print(text)
    if args.markdown:
        args.markdown.write_text("# Long requests: admission, cancel, disconnect\n\nOutput of "
                                 f"`python -m bench.long_bench{' --quick' if args.quick else ''}`.\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
