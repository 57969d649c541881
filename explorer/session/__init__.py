"""The session floor: one loaded model's tokens, runs, cache and worker (`Explorer`)."""
from .explorer import Explorer, Models, Text, TokenIds, cache_key

__all__ = ["Explorer", "Models", "Text", "TokenIds", "cache_key"]
