"""Internals of the GPT-2 explorer server; `model_utils` is the public facade."""
