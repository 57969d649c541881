"""The web floor: HTTP only — parse, call one operation, serialize, errors."""
from __future__ import annotations

from flask import Flask

from . import info, jobs, operations


def register(app: Flask) -> None:
    for module in (info, operations, jobs):
        app.register_blueprint(module.bp)
