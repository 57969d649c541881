"""Polling and cancelling long computations started with `"async": true` (or POST /jobs/chg)."""
from __future__ import annotations

from flask import Blueprint, Response

from .common import error, job_manager, json_response

bp = Blueprint("jobs", __name__)


def _missing(job_id: str) -> Response:
    manager = job_manager()
    return error(f"no job {job_id!r}: it never existed, or it ended more than "
                 f"{manager.ttl_seconds:.0f} s ago and was forgotten", 404)


@bp.get("/jobs/<job_id>")
def get_job(job_id: str) -> Response:
    job = job_manager().get(job_id)
    return json_response(job.describe()) if job else _missing(job_id)


@bp.delete("/jobs/<job_id>")
def cancel_job(job_id: str) -> Response:
    job = job_manager().get(job_id)
    if job is None:
        return _missing(job_id)
    job.cancel()
    return json_response(job.describe())
