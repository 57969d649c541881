"""Jobs that every replica answers, through Redis (redis-py; no Ray here).

Each replica runs the jobs it accepted exactly as the single server does (`runtime.jobs.JobManager`:
chunks on its model worker, the same bounds per replica) and mirrors them into Redis:

- `explorer:job:<id>`: `{"owner": replica, "state": <GET /jobs answer>}`, written when the job
  starts and ends and every SYNC_SECONDS while its state changes; kept JOB_TTL_SECONDS after it ends,
  removed when the owner forgets it (its 32 remembered).
- `explorer:cancel:<id>`: a `DELETE` made through another replica; the owner reads it within
  SYNC_SECONDS and stops the job before its next chunk.
- `explorer:replica:<replica>`: the owner's heartbeat (pid, host, model), refreshed every
  SYNC_SECONDS and expiring REPLICA_TTL_SECONDS later.

A replica that dies (SIGKILL, a lost node, a failed health check) stops its heartbeat: once the
key has expired, its unfinished jobs read `error` with the reason, through any replica, and every
replica's sync loop writes that down. So a job never shows `running` for longer than
REPLICA_TTL_SECONDS + SYNC_SECONDS after its replica died (not resumed: a job's chunks hold
state in the dead process, and running it again elsewhere could run it twice).

Why our own code on redis-py rather than Ray Serve's task consumer (Celery): the explorer's jobs are
generators whose chunks must run on the model worker between interactive requests, which
Celery's worker threads do not do; Celery cannot stop a running task (a cancel flag is needed
anyway), reports unknown ids as PENDING (the 404 needs a record anyway), and redelivers a
dead worker's task only after its visibility timeout, running jobs longer than it twice.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from typing import Any

import orjson
import redis

from ..errors import Overloaded
from ..runtime.engine import ModelWorker
from ..runtime.jobs import Job, JobManager, Steps

log = logging.getLogger("explorer")

PREFIX = "explorer:"
SYNC_SECONDS = 0.5  # progress mirrored, cancels read and the heartbeat refreshed this often
REPLICA_TTL_SECONDS = 10.0  # a replica silent this long is gone; well above a stalled sync round
UNFINISHED = PREFIX + "unfinished"  # ids of jobs not ended, for the sweep of dead owners
FINISHED = ("done", "error", "cancelled")


def _job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def _cancel_key(job_id: str) -> str:
    return f"{PREFIX}cancel:{job_id}"


def replica_key(replica: str) -> str:
    return f"{PREFIX}replica:{replica}"


def _store_error(exc: redis.RedisError) -> Overloaded:
    log.warning("job store unreachable: %s", exc)
    return Overloaded("the job store (Redis) did not answer; retry shortly", retry_after=5)


class RemoteJob:
    """A job another replica runs, as its Redis record shows it (what `web/jobs.py` reads)."""

    def __init__(self, store: "SharedJobs", job_id: str, record: dict[str, Any]) -> None:
        self._store, self.id, self._record = store, job_id, record

    def describe(self) -> dict[str, Any]:
        state = dict(self._record["state"])
        if state["status"] not in FINISHED and self._store.cancel_requested(self.id):
            state["status"] = "cancelling"
        return state

    def cancel(self) -> bool:
        if self._record["state"]["status"] in FINISHED:
            return False
        self._store.request_cancel(self.id)
        return True


class SharedJobs(JobManager):
    """A `JobManager` whose jobs every replica sharing `client` can read and cancel."""

    def __init__(self, client: redis.Redis, replica: str, about: dict[str, Any]) -> None:
        super().__init__()
        self.redis = client
        self.replica = replica
        self._about = orjson.dumps({**about, "pid": os.getpid(), "host": socket.gethostname()})
        self._written: dict[str, bytes] = {}  # what Redis holds of each local job, to skip rewrites
        self._write_lock = threading.Lock()  # a state is read and written as one step: never a stale overwrite
        self._stop = threading.Event()
        self._beat()  # registered before the first request can name this replica as an owner
        self._thread = threading.Thread(target=self._sync_loop, name="job-sync", daemon=True)
        self._thread.start()

    # --- what web/jobs.py and web/operations.py call ---------------------------------------

    def start(self, kind: str, steps: Steps, worker: ModelWorker) -> Job:
        with self._lock:
            before = set(self._jobs)
        job = super().start(kind, steps, worker)
        with self._lock:
            forgotten = before - set(self._jobs)
        try:
            self._write(job)
            if forgotten:
                self.redis.delete(*map(_job_key, forgotten))
        except redis.RedisError as exc:
            job.cancel()  # unreachable from the other replicas: do not run it
            raise _store_error(exc) from None
        job.done.add_done_callback(lambda _: self._write_quietly(job))
        return job

    def get(self, job_id: str) -> Job | RemoteJob | None:
        local = super().get(job_id)
        if local is not None:
            return local
        try:
            raw = self.redis.get(_job_key(job_id))
            if raw is None:
                return None
            record = orjson.loads(raw)
            if record["state"]["status"] not in FINISHED and not self.redis.exists(replica_key(record["owner"])):
                record = self._fail_orphan(job_id, record)
        except redis.RedisError as exc:
            raise _store_error(exc) from None
        return RemoteJob(self, job_id, record)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(_cancel_key(job_id)))

    def request_cancel(self, job_id: str) -> None:
        self.redis.set(_cancel_key(job_id), b"1", ex=int(self.ttl_seconds))

    def close(self) -> None:
        """Stop syncing; this replica's unfinished jobs end `error` now instead of after the TTL."""
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            jobs = [j for j in self._jobs.values() if j.ended is None]
        try:
            for job in jobs:
                job.cancel()
                self._fail_orphan(job.id, {"owner": self.replica, "state": job.describe()}, "shut down")
            self.redis.delete(replica_key(self.replica))
        except redis.RedisError as exc:
            log.warning("could not record the end of this replica's jobs: %s", exc)

    # --- mirroring ---------------------------------------------------------------------------

    def _write(self, job: Job) -> None:
        with self._write_lock:
            state = job.describe()
            body = orjson.dumps({"owner": self.replica, "state": state}, option=orjson.OPT_SERIALIZE_NUMPY)
            if self._written.get(job.id) == body:
                return
            pipe = self.redis.pipeline()
            if state["status"] in FINISHED:
                pipe.set(_job_key(job.id), body, ex=int(self.ttl_seconds))
                pipe.srem(UNFINISHED, job.id)
                pipe.delete(_cancel_key(job.id))
                self._written.pop(job.id, None)
            else:
                pipe.set(_job_key(job.id), body)
                pipe.sadd(UNFINISHED, job.id)
                self._written[job.id] = body
            pipe.execute()

    def _write_quietly(self, job: Job) -> None:
        try:
            self._write(job)
        except redis.RedisError as exc:  # the sync loop writes it again once Redis is back
            log.warning("job %s: could not record its end: %s", job.id, exc)

    def _fail_orphan(self, job_id: str, record: dict[str, Any], how: str = "stopped") -> dict[str, Any]:
        """Record a job whose replica is gone as failed (the reason names the replica)."""
        state = {**record["state"], "status": "error",
                 "error": f"the replica that ran this job ({record['owner']}) {how} before it ended; "
                          "submit it again"}
        state.pop("result", None)
        failed = {"owner": record["owner"], "state": state}
        pipe = self.redis.pipeline()
        pipe.set(_job_key(job_id), orjson.dumps(failed), ex=int(self.ttl_seconds))
        pipe.srem(UNFINISHED, job_id)
        pipe.delete(_cancel_key(job_id))
        pipe.execute()
        return failed

    def _beat(self) -> None:
        self.redis.set(replica_key(self.replica), self._about, px=int(REPLICA_TTL_SECONDS * 1000))

    def _sync_loop(self) -> None:
        while not self._stop.wait(SYNC_SECONDS):
            try:
                self._sync()
            except redis.RedisError as exc:  # keep trying: the heartbeat matters more than one round
                log.warning("job sync failed: %s", exc)

    def _sync(self) -> None:
        self._beat()
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            if job.ended is None and self.cancel_requested(job.id):
                job.cancel()
            if job.id in self._written or job.ended is None:
                self._write(job)
        for raw_id in self.redis.smembers(UNFINISHED):  # jobs of replicas that died
            job_id = raw_id.decode()
            raw = self.redis.get(_job_key(job_id))
            if raw is None:
                self.redis.srem(UNFINISHED, job_id)
                continue
            record = orjson.loads(raw)
            if not self.redis.exists(replica_key(record["owner"])):
                self._fail_orphan(job_id, record)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRedis:
    """A private `redis-server` on a free loopback port, without persistence (the cluster command
    when no --redis is given, and the tests). `stop()` ends it."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server); "
                               "or give --redis redis://HOST:PORT")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no"], stdout=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
