"""Experiment files and replay (`python -m explorer run|replay`): requests run in-process through
the server's own app, their results written with provenance and figures, and re-checked later."""
