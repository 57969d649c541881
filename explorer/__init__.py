"""Internals of the GPT-2 explorer server; `model_utils` is the public facade."""

__version__ = "1.2.0"  # the package's version; a checkout's provenance also carries its git commit
