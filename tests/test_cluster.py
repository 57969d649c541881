"""The Ray Serve cluster (explorer/cluster): routing keys, the health probe and the Redis job store
without Ray, then a local Ray with two replicas of the tiny model behind the ingress: cache
affinity, spread, jobs across replicas, a replica killed with SIGKILL (with a job on it), a client
that disconnects, and beside it a replica with a stuck worker (replaced) and an autoscaled
deployment (a second replica under load); nothing left running afterwards. Needs requirements-cluster.txt and Debian's redis-server."""
from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the cluster is an optional install: requirements-cluster.txt")
redis = pytest.importorskip("redis")

from app import create_app  # noqa: E402
from explorer.cluster.forward import route  # noqa: E402
from explorer.cluster.serve import Probe  # noqa: E402
from explorer.cluster.jobs import (REPLICA_TTL_SECONDS, SYNC_SECONDS, LocalRedis, SharedJobs,  # noqa: E402
                                   free_port, replica_key)
from explorer.runtime.engine import ModelWorker  # noqa: E402
from explorer.runtime.jobs import MAX_RUNNING_JOBS  # noqa: E402
from tests.helpers import CLEAN, CORRUPT, TARGET, TEXT, ok  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

LONG_JOB = {"texts": [CLEAN], "targets": [" Mary"], "steps": 1000}  # ~3000 Adam steps: runs for seconds
# A causal trace of the tiny model's longest text: 40 noisy samples run for about 20 s of one core in
# chunks, estimated under the 60 s a synchronous request may take once a small trace measured the speed.
TRACE = {"text": "Alice " + " ".join(f"w{i}" for i in range(30)), "subject": "Alice", "kind": "mlp"}
ENDED = ("done", "error", "cancelled")


@pytest.fixture(scope="module")
def store():
    server = LocalRedis()
    yield server
    server.stop()
    assert server.process.poll() is not None


# --- without Ray ------------------------------------------------------------------------------

def test_the_routing_key_is_the_model_and_the_text_a_request_is_about():
    models = ["a", "b"]
    key = lambda body, path="/x": route("POST", path, json.dumps(body).encode(), None, models).key  # noqa: E731
    assert key({"text": TEXT, "layer": 1}) == key({"layer": 2, "text": TEXT}, "/attention") == key({"text": TEXT})
    assert key({"text": TEXT}) != key({"text": TEXT, "model": "b"})
    assert key({"text": TEXT}) == key({"text": TEXT, "model": "a"})  # the default model, named or not
    assert key({"clean": CLEAN, "corrupt": CORRUPT}) == key({"clean": CLEAN, "corrupt": "other"}) == key({"text": CLEAN})
    assert key({"token_ids": [1, 2]}) == key({"clean_ids": [1, 2], "corrupt_ids": [3, 4]}) != key({"token_ids": [1, 3]})
    assert key({"prompt": TEXT, "max_new_tokens": 3}) == key({"text": TEXT})
    assert key({"texts": [TEXT, CLEAN]}) != key({"texts": [CLEAN, TEXT]})
    assert route("POST", "/x", json.dumps({"text": TEXT, "model": "b"}).encode(), None, models).model == "b"
    bad = route("POST", "/x", b'{"text": "a", "model": "c"}', None, models)
    assert bad.error == "model 'c' is not loaded; loaded models: 'a', 'b'"
    assert route("POST", "/x", b"[1]", None, models) == ("a", None, False, None)  # the replica's 400
    assert route("POST", "/x", b'{"text": "a", "model": 3}', None, models) == ("a", route(
        "POST", "/x", b'{"text": "a"}', None, models).key, False, None)  # the replica names the field
    assert route("POST", "/generate", b'{"prompt": "a", "stream": true}', None, models).stream
    assert route("GET", "/jobs/abc", b"", None, models) == ("a", "/jobs/abc", False, None)
    assert route("GET", "/model", b"", "b", models) == ("b", None, False, None)
    assert route("GET", "/model", b"", "c", models).error.startswith("model 'c' is not loaded")


def test_the_probe_reports_a_stuck_worker_and_only_then():
    worker = ModelWorker()
    probe = Probe(worker, stuck_seconds=0.3)
    probe.check()
    worker.wait_idle(5)
    probe.check()  # the first probe ran: healthy, and another is queued
    release = threading.Event()
    worker.wait_idle(5)
    worker.submit(lambda: release.wait(10))
    probe.check()
    time.sleep(0.2)
    probe.check()  # waiting, within the bound
    time.sleep(0.2)
    with pytest.raises(RuntimeError, match="stuck"):
        probe.check()
    release.set()
    worker.wait_idle(5)
    probe.check()
    worker.close()


def test_the_deploy_configs_are_valid_serve_configs_that_build():
    import yaml
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from explorer.cluster.cli import build

    root = Path(__file__).resolve().parent.parent / "deploy"
    manifest = list(yaml.safe_load_all((root / "rayservice.yaml").read_text()))
    service = next(d for d in manifest if d["kind"] == "RayService")
    for config in (yaml.safe_load((root / "serve-config.yaml").read_text()),
                   yaml.safe_load(service["spec"]["serveConfigV2"])):
        app = ServeDeploySchema.model_validate(config).applications[0]
        assert app.import_path == "explorer.cluster.cli:build"
        assert isinstance(build(app.args), Application)
    scaled = build({"model": ["a", "b/c"], "redis": "redis://x:1/0", "replicas": 2, "min_replicas": 1,
                    "max_replicas": 4, "num_gpus": 0.5, "num_cpus": 3, "queue_size": 10, "http_threads": 6})
    ingress = scaled._bound_deployment
    models = {name: app._bound_deployment for name, app in ingress.init_args[0].items()}
    assert ingress.name == "router" and list(models) == ["a", "b/c"]
    for name, deployment in models.items():
        assert deployment.name == {"a": "model-a", "b/c": "model-b_c"}[name]
        assert deployment.ray_actor_options == {"num_cpus": 3, "num_gpus": 0.5}
        assert deployment.max_ongoing_requests == 16  # the replica's queue and its HTTP threads
        scaling = deployment._deployment_config.autoscaling_config
        assert (scaling.min_replicas, scaling.max_replicas, scaling.initial_replicas) == (1, 4, 2)
        assert deployment.init_args[0]["MODEL"] == [name] and deployment.init_args[2] == 3  # torch threads
    with pytest.raises(ValueError, match="redis"):
        build({"model": ["gpt2"]})
    with pytest.raises(ValueError, match="replica"):  # a flag the command line does not know
        build({"model": ["gpt2"], "redis": "redis://x:1/0", "replica": 2})


@pytest.fixture()
def two_apps(tiny_model, store):
    """Two apps of the tiny model sharing one Redis, as two replicas do: (clients, job stores)."""
    client = redis.Redis.from_url(store.url)
    client.flushdb()
    jobs = [SharedJobs(client, f"replica-{i}", {"model": "tiny"}) for i in range(2)]
    apps = [create_app({"TESTING": True}, model=tiny_model) for _ in range(2)]
    for app, shared in zip(apps, jobs):
        app.extensions["jobs"] = shared
    yield [a.test_client() for a in apps], jobs
    for app, shared in zip(apps, jobs):
        for job in list(shared._jobs.values()):
            job.cancel()
        app.extensions["explorer"].worker.wait_idle(60)
        shared.close()


def wait_status(client, job: str, wanted: tuple[str, ...], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = ok(client.get(f"/jobs/{job}"))
        if state["status"] in wanted:
            return state
        time.sleep(0.05)
    raise AssertionError(f"job {job} is still {state['status']}")


def test_a_job_started_on_one_replica_is_read_and_cancelled_through_the_other(two_apps):
    (a, b), _ = two_apps
    body = {"clean": CLEAN, "corrupt": CORRUPT, **TARGET, "site": "heads", "async": True}
    job = a.post("/patch", json=body).get_json()["job"]
    done = wait_status(b, job, ENDED)
    assert done == ok(a.get(f"/jobs/{job}"))  # one state, whichever replica answers
    expected = ok(a.post("/patch", json={k: v for k, v in body.items() if k != "async"}))
    assert done["status"] == "done" and done["result"]["effect"] == expected["effect"]
    long = a.post("/jobs/chg", json=LONG_JOB).get_json()["job"]
    running = wait_status(b, long, ("running",))
    assert running["kind"] == "chg" and 0 <= running["progress"] < 1
    cancelling = ok(b.delete(f"/jobs/{long}"))
    assert cancelling["status"] == "cancelling"
    started = time.monotonic()
    assert wait_status(b, long, ENDED)["status"] == "cancelled"
    assert time.monotonic() - started < 5 * SYNC_SECONDS + 2  # read by the owner's sync, stopped at a chunk
    assert ok(a.get(f"/jobs/{long}"))["status"] == "cancelled"
    for client in (a, b):
        assert client.get("/jobs/0123456789abcdef").status_code == 404
        assert client.delete("/jobs/0123456789abcdef").status_code == 404


def test_the_job_bounds_hold_per_replica(two_apps):
    (a, b), _ = two_apps
    ids = [a.post("/jobs/chg", json=LONG_JOB).get_json()["job"] for _ in range(MAX_RUNNING_JOBS)]
    refused = a.post("/jobs/chg", json=LONG_JOB)
    assert refused.status_code == 503 and refused.headers["Retry-After"]
    assert b.post("/jobs/chg", json=LONG_JOB).status_code == 202  # another replica has its own slots
    for job in ids:
        b.delete(f"/jobs/{job}")
    for job in ids:
        assert wait_status(b, job, ENDED)["status"] == "cancelled"


def test_a_dead_replicas_job_ends_failed_with_the_reason(two_apps):
    (a, b), (owner, _) = two_apps
    job = a.post("/jobs/chg", json=LONG_JOB).get_json()["job"]
    wait_status(b, job, ("running",))
    owner._stop.set()  # the replica dies: no more heartbeats or syncs ...
    owner._thread.join(5)
    owner.redis.delete(replica_key(owner.replica))  # ... and its heartbeat expires
    failed = ok(b.get(f"/jobs/{job}"))
    assert failed["status"] == "error" and "replica-0" in failed["error"] and "result" not in failed
    for j in list(owner._jobs.values()):
        j.cancel()


# --- on a local Ray ---------------------------------------------------------------------------

def call(base: str, path: str, body: dict | None = None, method: str | None = None) -> tuple[int, dict, str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.load(resp), resp.headers.get("X-Replica", "")
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc), exc.headers.get("X-Replica", "")


def processes_under(path: str) -> list[int]:
    """Processes whose command line names `path` (the Ray session's temp dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and path in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


class Cluster:
    """A local Ray (2 CPUs), a redis-server and the application with two tiny-model replicas."""

    def __init__(self, model_dir: Path) -> None:
        import ray

        from explorer.cluster.cli import parse_args, start

        self.ray = ray
        self.temp = tempfile.mkdtemp(prefix="ray-")
        self.redis = LocalRedis()
        self.client = redis.Redis.from_url(self.redis.url)
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 << 20, _temp_dir=self.temp,
                 log_to_driver=False)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.start_seconds = start(parse_args(["--model", str(model_dir), "--replicas", "2", "--port", str(port),
                                               "--redis", self.redis.url, "--stuck-seconds", "60",
                                               "--queue-size", "4"]), self.redis.url)
        self.closed = False

    def replicas(self) -> dict[str, int]:
        """Live replicas by name (the X-Replica header) -> pid, from their heartbeats."""
        return {k.decode().split(":", 2)[2]: json.loads(self.client.get(k))["pid"]
                for k in self.client.keys(replica_key("*"))}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        from ray import serve

        serve.shutdown()
        self.ray.shutdown()
        self.redis.stop()


@pytest.fixture(scope="module")
def cluster(tiny_dir):
    c = Cluster(tiny_dir)
    yield c
    c.close()


def owners(cluster: Cluster, texts: list[str]) -> dict[str, str]:
    """text -> the replica that answered /tokenize for it."""
    answers = {t: call(cluster.url, "/tokenize", {"text": t}) for t in texts}
    assert all(status == 200 for status, _, _ in answers.values())
    return {t: replica for t, (_, _, replica) in answers.items()}


def health_of(cluster: Cluster, replica: str) -> dict:
    """GET /health answered by `replica` (health checks go to any replica: ask until it answers)."""
    for _ in range(200):
        status, body, who = call(cluster.url, "/health")
        if who == replica:
            return body
    raise AssertionError(f"{replica} never answered /health")


def test_one_text_reaches_one_replica_and_its_cache(cluster):
    assert cluster.start_seconds < 300
    assert len(cluster.replicas()) == 2
    status, first, replica = call(cluster.url, "/predict", {"text": TEXT, "token_index": 3, "top_k": 3})
    assert status == 200 and replica in cluster.replicas()
    before = health_of(cluster, replica)["cache"]
    seen = {call(cluster.url, path, {"text": TEXT, **extra})[2]
            for path, extra in [("/predict", {"token_index": 3, "top_k": 3})] * 25
            + [("/attention", {"layer": 1}), ("/lens", {"top_k": 2}), ("/trace", {}), ("/tokenize", {}),
               ("/predict", {"token_index": 2})]}
    assert seen == {replica}
    after = health_of(cluster, replica)["cache"]
    assert after["hits"] - before["hits"] >= 29  # every request after the first read the cached run
    assert after["entries"] >= before["entries"]
    other = next(r for r in cluster.replicas() if r != replica)
    assert health_of(cluster, other)["cache"]["misses"] == 0  # the other replica never ran it
    status, again, _ = call(cluster.url, "/predict", {"text": TEXT, "token_index": 3, "top_k": 3})
    assert again == first
    status, body, _ = call(cluster.url, "/attention", {"text": TEXT, "layer": 99})
    assert status == 400 and "layer" in body["error"]  # the single server's errors, unchanged
    assert call(cluster.url, "/nope")[0] == 404
    assert call(cluster.url, "/tokenize", {"text": "a", "model": "nope"})[0] == 400
    stream = urllib.request.Request(cluster.url + "/generate", headers={"Content-Type": "application/json"},
                                    data=json.dumps({"prompt": TEXT, "max_new_tokens": 3, "stream": True}).encode())
    with urllib.request.urlopen(stream, timeout=60) as resp:  # server-sent events, passed through
        events = resp.read().decode()
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert events.count("event: progress") == 3 and events.count("event: result") == 1


def test_twelve_texts_spread_over_both_replicas(cluster):
    placed = owners(cluster, [f"{TEXT} number {i}" for i in range(12)])
    assert set(placed.values()) == set(cluster.replicas())
    assert owners(cluster, list(placed)) == placed  # and stay where they are


def test_a_job_is_polled_and_cancelled_through_the_other_replica(cluster):
    assert call(cluster.url, "/jobs/0123456789abcdef")[0] == 404
    assert call(cluster.url, "/jobs/0123456789abcdef", method="DELETE")[0] == 404
    for _ in range(20):  # polls are routed by the job's id: find a job whose polls reach the other replica
        status, started, owner = call(cluster.url, "/jobs/chg", LONG_JOB)
        assert status == 202
        status, state, poller = call(cluster.url, f"/jobs/{started['job']}")
        if poller != owner:
            break
        call(cluster.url, f"/jobs/{started['job']}", method="DELETE")
    assert status == 200 and poller != owner and state["kind"] == "chg"
    job = started["job"]
    status, cancelling, who = call(cluster.url, f"/jobs/{job}", method="DELETE")
    assert status == 200 and who == poller and cancelling["status"] in ("cancelling", "cancelled")
    deadline = time.monotonic() + 10
    while state["status"] not in ENDED and time.monotonic() < deadline:
        time.sleep(0.2)
        state = call(cluster.url, f"/jobs/{job}")[1]
    assert state["status"] == "cancelled"


def test_a_full_replica_answers_503_with_retry_after(cluster):
    from concurrent.futures import ThreadPoolExecutor

    body = {"subject": "Eiffel Tower", "samples": 10}
    with ThreadPoolExecutor(40) as pool:  # 40 new texts at once; each replica queues 4 model requests
        answers = list(pool.map(lambda i: call_with_headers(
            cluster.url, "/causal_trace", {"text": f"The Eiffel Tower {i} is in the city of", **body}), range(40)))
    statuses = sorted(status for status, _ in answers)
    assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
    assert all(int(headers.get("Retry-After", 0)) >= 1 for status, headers in answers if status == 503)
    assert any(headers.get("X-Replica") for status, headers in answers if status == 503)  # a replica's queue


def call_with_headers(base: str, path: str, body: dict) -> tuple[int, Message]:
    """(status, headers: names case-insensitive, as the proxy sends them in lower case)."""
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers


def test_a_killed_replica_loses_no_other_request_and_its_job_ends(cluster):
    texts = owners(cluster, [f"{TEXT} number {i}" for i in range(12)])
    pids = cluster.replicas()
    status, started, victim = call(cluster.url, "/jobs/chg", LONG_JOB)
    assert status == 202 and victim in pids
    job = started["job"]
    mine = [t for t, r in texts.items() if r == victim]
    theirs = [t for t, r in texts.items() if r != victim]
    os.kill(pids[victim], signal.SIGKILL)
    killed = time.monotonic()
    failures, served_again, job_state = [], {}, None
    while time.monotonic() - killed < 40 and (len(served_again) < len(mine) or job_state is None):
        for text in theirs:
            status, _, _ = call(cluster.url, "/tokenize", {"text": text})
            if status != 200:
                failures.append((text, status))
        for text in mine:
            if text not in served_again and call(cluster.url, "/tokenize", {"text": text})[0] == 200:
                served_again[text] = time.monotonic() - killed
        if job_state is None:
            status, state, _ = call(cluster.url, f"/jobs/{job}")
            if status == 200 and state["status"] in ENDED:
                job_state = (state, time.monotonic() - killed)
        time.sleep(0.1)
    assert failures == []
    assert len(served_again) == len(mine) and max(served_again.values()) < 30
    state, after = job_state
    print(f"after the kill: its texts served again within {max(served_again.values()):.1f} s, "
          f"its job ended {state['status']} after {after:.1f} s")  # shown with pytest -s
    assert state["status"] == "error" and victim in state["error"]
    assert after < REPLICA_TTL_SECONDS + SYNC_SECONDS + 5  # the documented bound, plus polling slack
    deadline = time.monotonic() + 60
    while (victim in cluster.replicas() or len(cluster.replicas()) < 2) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(cluster.replicas()) == 2 and victim not in cluster.replicas()  # Serve replaced it


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid`, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_rate(pids: list[int], seconds: float) -> float:
    """Cores the processes `pids` kept busy over the next `seconds`."""
    before = sum(map(cpu_seconds, pids))
    time.sleep(seconds)
    return (sum(map(cpu_seconds, pids)) - before) / seconds


def test_a_sync_request_stops_when_its_client_disconnects(cluster):
    assert call(cluster.url, "/causal_trace", {**TRACE, "samples": 2})[0] == 200  # measures the speed
    pids = list(cluster.replicas().values())  # both: a replica that just replaced a killed one may take the text
    data = json.dumps({**TRACE, "samples": 40}).encode()
    host, port = cluster.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /causal_trace HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    time.sleep(1.0)
    working = cpu_rate(pids, 2.0)
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):  # no answer yet: the trace was admitted and runs
        print(sock.recv(300))
    sock.close()
    time.sleep(1.5)  # Serve cancels the call; the trace stops after the chunk it runs (about 0.5 s)
    after = cpu_rate(pids, 3.0)
    print(f"replicas' CPU: {working:.2f} cores during the trace, {after:.2f} after its client left")  # pytest -s
    assert working > 0.2, working  # the trace was running (on a loaded machine it gets less than a core)
    assert after < working / 4, (working, after)  # the rest of its ~20 s never ran
    assert call(cluster.url, "/causal_trace", {**TRACE, "samples": 2})[0] == 200


def test_serve_replaces_a_replica_whose_worker_is_stuck(cluster, tiny_dir, monkeypatch):
    """One replica of the production deployment (its health check period and timeout, the probe),
    beside the application, whose worker the test holds in one call: its check fails once the probe
    waited `--stuck-seconds`, Serve marks it unhealthy after 3 failures in a row and replaces it."""
    from ray import serve
    from ray.exceptions import RayError

    from explorer.cluster import serve as cluster_serve
    from explorer.cluster.cli import options, parse_args
    from explorer.cluster.forward import REPLICA_HEADER, Request
    from tests.stuck_replica import StuckableServer

    stuck_seconds = 3.0
    monkeypatch.setattr(cluster_serve, "ModelServer", StuckableServer)  # what application() deploys
    args = parse_args(["--model", str(tiny_dir), "--num-cpus", "0", "--torch-threads", "1",
                       "--stuck-seconds", str(stuck_seconds), "--redis", cluster.redis.url])
    deployment = cluster_serve.application(options(args), cluster.redis.url)._bound_deployment.init_args[0][str(tiny_dir)]
    handle = serve.run(deployment, name="stuck", route_prefix=None)  # called by handle only
    name = cluster_serve.deployment_name(str(tiny_dir))

    def replica() -> str | None:
        try:
            _, headers, _ = handle.answer.remote(Request("GET", "/health", "", [], b"")).result(timeout_s=2)
        except (RayError, TimeoutError):  # the replica being replaced
            return None
        return dict(headers)[REPLICA_HEADER]

    first = replica()
    assert first in cluster.replicas()
    handle.stick.remote(600).result(timeout_s=30)
    stuck = time.monotonic()
    unhealthy = replaced = None
    while replaced is None and time.monotonic() - stuck < 150:
        states = serve.status().applications["stuck"].deployments[name].replica_states
        if unhealthy is None and states.get("RUNNING", 0) == 0:  # Serve stopped it (and starts another)
            unhealthy = time.monotonic() - stuck
        now = replica()
        if now not in (None, first):
            replaced = time.monotonic() - stuck
        time.sleep(0.5)
    while first in cluster.replicas() and time.monotonic() - stuck < 150:
        time.sleep(0.5)
    gone = time.monotonic() - stuck
    print(f"stuck replica: unhealthy after {unhealthy} s, a new one answered after {replaced} s, "
          f"the old one's heartbeat gone after {gone:.1f} s")  # pytest -s
    period = cluster_serve.HEALTH_CHECK_SECONDS * 1.1  # Serve jitters the period by +-10%
    # Probe queued at the first check after the stall, late at the first check S later, then two more;
    # plus one round of this loop (a call to a stopping replica times out after 2 s).
    assert unhealthy is not None and unhealthy < stuck_seconds + 4 * period + 3, unhealthy
    assert replaced is not None and first not in cluster.replicas()
    serve.delete("stuck")


def test_requests_above_the_target_add_a_replica(cluster, tiny_dir):
    """The production deployment with --max-replicas 2 (its target: half the model queue), only
    Serve's delays shortened: four long requests at once on one replica bring up a second."""
    from ray import serve

    from explorer.cluster import serve as cluster_serve
    from explorer.cluster.cli import options, parse_args
    from explorer.cluster.forward import Request

    args = parse_args(["--model", str(tiny_dir), "--num-cpus", "0", "--torch-threads", "1", "--queue-size", "4",
                       "--min-replicas", "1", "--max-replicas", "2", "--redis", cluster.redis.url])
    deployment = cluster_serve.application(options(args), cluster.redis.url)._bound_deployment.init_args[0][
        str(tiny_dir)]._bound_deployment
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 2, 2)
    quick = deployment.options(autoscaling_config={
        "min_replicas": 1, "max_replicas": 2, "initial_replicas": 1, "target_ongoing_requests": 2,
        "upscale_delay_s": 1.0, "look_back_period_s": 11.0})  # Serve's defaults: 30 s each (the look-back
    # must exceed the 10 s between a replica's load reports)
    handle = serve.run(quick.bind(*deployment.init_args), name="scaled", route_prefix=None)
    name = cluster_serve.deployment_name(str(tiny_dir))

    def running() -> int:
        return serve.status().applications["scaled"].deployments[name].replica_states.get("RUNNING", 0)

    def trace(samples: int, key: str):
        body = json.dumps({**TRACE, "samples": samples}).encode()
        return handle.options(session_id=key).answer.remote(
            Request("POST", "/causal_trace", "", [("content-type", "application/json")], body))

    assert trace(2, "warm").result(timeout_s=60)[0] == 200  # measures the speed
    assert running() == 1
    loaded = time.monotonic()
    traces = [trace(40, f"text {i}") for i in range(4)]  # ~20 s each, one after another on one worker
    while running() < 2 and time.monotonic() - loaded < 100:
        time.sleep(0.5)
    print(f"a second replica ran {time.monotonic() - loaded:.1f} s after 4 requests against a target of 2")
    assert running() == 2
    for t in traces:  # the client leaves: the traces stop at their next chunk
        t.cancel()
    serve.delete("scaled")


def test_nothing_is_left_running(cluster):
    assert processes_under(cluster.temp)  # the check sees Ray's processes while they run
    cluster.close()
    deadline = time.monotonic() + 30
    while processes_under(cluster.temp) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_under(cluster.temp) == []
    assert cluster.redis.process.poll() is not None
