"""Causal interventions: activation patching and causal tracing."""
from __future__ import annotations

from flask import Blueprint

bp = Blueprint("causal", __name__)
