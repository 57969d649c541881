"""HTTP layer: one Flask blueprint per topic, each route parse -> validate -> one core call -> JSON."""
from __future__ import annotations

from flask import Flask

from . import causal, core, heads, jobs, lens


def register(app: Flask) -> None:
    for module in (core, causal, heads, jobs, lens):
        app.register_blueprint(module.bp)
