"""The runtime floor: loading models, the model worker, the byte-bounded cache, chunked jobs."""
