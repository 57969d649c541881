"""The session floor: one loaded model's tokens, runs, cache and worker (`Explorer`)."""
from .explorer import Explorer, Models, cache_key

__all__ = ["Explorer", "Models", "cache_key"]
