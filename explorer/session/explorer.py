"""`Explorer`: one loaded model's session — its tokens, cached runs and activations, and the
worker thread every use of the model goes through. `Models`: the loaded models by name.

It knows nothing of requests or endpoints: the operations floor calls it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import threading
import time
from typing import Any, Callable, Hashable, Sequence, TypeVar

from ..errors import InvalidRequest
from ..math import replay, sae as sae_math
from ..math import forward as fw
from ..math.forward import Run
from ..math.lens import batches
from ..math.replay import Budget, position_flops
from ..runtime.engine import (CPU_FLOPS, DEFAULT_CACHE_BYTES, DEFAULT_QUEUE_SIZE, DEFAULT_WORK_BYTES, GPU_FLOPS,
                              ByteLRU, CacheBudget, ModelWorker, Throughput, result_within)
from ..runtime import jlens
from ..runtime.jlens import DEFAULT_DIR as DEFAULT_LENS_DIR
from ..runtime.loading import LoadedModel, ModelLoadError
from ..runtime.saes import SAE

T = TypeVar("T")
TOKENIZE_CACHE_ENTRIES = 512
BATCH_TOKENS = 2048  # padded tokens per batched forward of several new texts; more run as further batches


class TokenIds(tuple):
    """Token ids given instead of a text, and the request field they came from, which errors name.
    Equal to the plain tuple and hashed as it, so cache keys do not depend on the field."""

    field: str

    def __new__(cls, ids: Sequence[int], field: str = "token_ids") -> "TokenIds":
        out = super().__new__(cls, ids)
        out.field = field
        return out


# What a request is about: a text (tokenized with the model's special tokens), or token ids as given.
Text = str | tuple[int, ...]


def cache_key(kind: str, text: Text, *detail: Hashable) -> tuple[Hashable, ...]:
    """The one shape of a cache key: what the entry is (`kind`: "run", "acts", "lens", ...; the
    list is in docs/architecture.md), the text (or token ids) it is about, then what else it
    depends on (a position, a layer, a target...). Entries of one text share its prefix."""
    return (kind, text, *detail)


class Explorer:
    """One model's session; every method is safe to call from many request threads."""

    def __init__(self, model: LoadedModel, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 queue_size: int = DEFAULT_QUEUE_SIZE, budget: CacheBudget | None = None,
                 work_bytes: int = DEFAULT_WORK_BYTES, lens_dir: str = DEFAULT_LENS_DIR) -> None:
        """`budget`: a byte bound shared with other models' explorers (default: its own of
        `cache_bytes`); `work_bytes`: the working memory one request's chunk may use; `lens_dir`:
        where fitted Jacobian lenses are saved."""
        self.model = model
        self.lens_dir = lens_dir
        self.worker = ModelWorker(queue_size, model.lock)
        self.cache = ByteLRU(self.worker, cache_bytes, budget=budget)
        self.work_bytes = work_bytes
        self.throughput = Throughput(GPU_FLOPS if str(model.cfg.device).startswith("cuda") else CPU_FLOPS)
        # HF fast tokenizers mutate their backend's padding/truncation state on every call.
        self._tokenizer_lock = threading.Lock()
        self.tokens = functools.lru_cache(maxsize=TOKENIZE_CACHE_ENTRIES)(self._tokens)
        self.saes: dict[str, SAE] = {}

    @property
    def cfg(self) -> Any:
        return self.model.cfg

    @property
    def bridge(self) -> Any:
        return self.model.bridge

    @property
    def n_ctx(self) -> int:
        return int(self.model.cfg.n_ctx)

    # --- tokens -------------------------------------------------------------------------------

    def _tokens(self, text: Text) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """Token ids, with the special tokens the model expects around a text (`special_ids`:
        BOS first where the model uses one; BERT's `[CLS] ... [SEP]`), and each token's decoded
        string. Token ids given instead of a text (a tuple) are taken as they are (`given_ids`)."""
        if isinstance(text, tuple):
            return self.given_ids(getattr(text, "field", "token_ids"), text)
        if not text:
            raise InvalidRequest("text must be a non-empty string")
        tok = self.model.tokenizer
        before, after = self.model.special_ids
        with self._tokenizer_lock:
            ids = [*before, *tok.encode(text, add_special_tokens=False), *after]
            if len(ids) > self.n_ctx:
                raise InvalidRequest(
                    f"text is {len(ids)} tokens long (special tokens included); the model's context "
                    f"holds at most {self.n_ctx} (n_ctx)")
            strs = tok.batch_decode([[i] for i in ids])
        return tuple(ids), tuple(strs)

    def given_ids(self, field: str, ids: Sequence[int]) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """Token ids given by the user, taken as they are (no special token added): each must be in
        the vocabulary, and there must be 1 .. n_ctx of them; and each token's decoded string."""
        d_vocab = int(self.cfg.d_vocab)
        if not 1 <= len(ids) <= self.n_ctx:
            raise InvalidRequest(f"{field} must hold between 1 and {self.n_ctx} (n_ctx) token ids, got {len(ids)}")
        bad = next((i for i in ids if not 0 <= i < d_vocab), None)
        if bad is not None:
            raise InvalidRequest(f"{field}[] must be token ids between 0 and {d_vocab - 1}, got {bad}")
        with self._tokenizer_lock:
            strs = self.model.tokenizer.batch_decode([[i] for i in ids])
        return tuple(ids), tuple(strs)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, special tokens left out."""
        with self._tokenizer_lock:
            return self.model.tokenizer.decode(list(ids), skip_special_tokens=True)

    def text_positions(self, seq: int) -> range:
        """The positions of the text's own tokens in a tokenized text of length `seq`."""
        before, after = self.model.special_ids
        return range(len(before), seq - len(after))

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Character span [begin, end) of each of `text`'s tokens (special tokens excluded)."""
        with self._tokenizer_lock:
            enc = self.model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [tuple(span) for span in enc["offset_mapping"]]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens."""
        with self._tokenizer_lock:
            return self.model.tokenizer.encode(text, add_special_tokens=False)

    @functools.cached_property
    def vocab_strs(self) -> list[str]:
        """Decoded string of every vocabulary id (for lens predictions), computed once."""
        tok = self.model.tokenizer
        with self._tokenizer_lock:
            return tok.batch_decode([[i] for i in range(int(self.model.cfg.d_vocab))])

    # --- the worker and the cache -------------------------------------------------------------

    def cached(self, key: Hashable, compute: Callable[[], T]) -> T:
        """The cached value of `key`, computed on the worker once (concurrent askers share it)."""
        return self.cache.get_or_compute(key, compute)

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the model worker (inline when already there) and wait for it."""
        if self.worker.on_worker():
            return fn()
        return result_within(self.worker.submit(fn), self.cache.wait_seconds)

    # --- cost -------------------------------------------------------------------------------

    def budget(self, seq: int, reserved: int = 0) -> Budget:
        """What one chunk of long work on a text of `seq` tokens may use (`replay.budget`), with
        `reserved` bytes of the working memory already taken by what the work keeps throughout."""
        return replay.budget(self.cfg, seq, max(0, self.work_bytes - reserved), self.throughput.rate,
                             self.throughput.record)

    def seconds(self, work: float, seq: int) -> float:
        """Estimated seconds of `work` rows x positions x blocks on texts of `seq` tokens."""
        return work * position_flops(self.cfg, seq) / self.throughput.rate

    def _measured(self, fn: Callable[[], T], seqs: Sequence[int]) -> T:
        """Run a forward pass over texts of `seqs` tokens and record its throughput."""
        started = time.perf_counter()
        out = fn()
        n_layers = int(self.cfg.n_layers)
        self.throughput.record(sum(n_layers * s * position_flops(self.cfg, s) for s in seqs),
                               time.perf_counter() - started)
        return out

    # --- runs ---------------------------------------------------------------------------------

    def run(self, text: Text) -> Run:
        """The cached forward pass of `text` (computed once, shared by every endpoint)."""
        ids, _ = self.tokens(text)
        return self.cached(cache_key("run", text), lambda: self._measured(lambda: fw.forward(self.bridge, ids),
                                                                          [len(ids)]))

    def runs(self, texts: Sequence[Text]) -> list[Run]:
        """The cached runs of `texts`; those not cached yet are computed first in right-padded
        batches of at most BATCH_TOKENS tokens on the worker, and cached like any other run."""
        def fill() -> None:
            missing = [t for t in dict.fromkeys(texts) if self.cache.get(cache_key("run", t)) is None]
            ids = [self.tokens(t)[0] for t in missing]
            for group in batches([len(i) for i in ids], BATCH_TOKENS):
                batch = [ids[i] for i in group]
                runs = self._measured(lambda: fw.forward_batch(self.bridge, batch), [len(i) for i in batch])
                for i, run in zip(group, runs):
                    self.cache.fill(cache_key("run", missing[i]), run)

        if sum(self.cache.get(cache_key("run", t)) is None for t in set(texts)) > 1:
            self.call(fill)
        return [self.run(t) for t in texts]

    def hook_activation(self, text: Text, hook: str) -> Any:
        """The activation at `hook` [seq, ...] of `text`'s pass: read from the cached run for the
        residual stream between blocks, else from a pass stopped at the hook (cached)."""
        ids, _ = self.tokens(text)
        layer = int(hook.split(".")[1])
        if hook == fw.resid_hook(layer) or (hook == f"blocks.{layer}.hook_resid_pre" and layer > 0):
            return self.run(text).resid[layer if hook.endswith("post") else layer - 1]
        return self.cached(cache_key("hook", text, hook), lambda: sae_math.hook_activation(self.bridge, ids, hook))

    # --- sparse autoencoders ------------------------------------------------------------------

    def add_sae(self, sae: SAE) -> None:
        """Serve `sae` on this model; `ModelLoadError` when its hook is not one of the model's, its
        input width is not the hook's, or its name is taken."""
        if sae.name in self.saes:
            raise ModelLoadError(f"two SAEs on model {self.model.name!r} are named {sae.name!r}; give each a name=")
        if sae.hook not in self.bridge.hook_dict or sae.layer >= int(self.cfg.n_layers):
            raise ModelLoadError(f"SAE {sae.name!r} reads {sae.hook}, which model {self.model.name!r} does not have "
                                 f"(it has {self.cfg.n_layers} layers; hooks look like blocks.0.hook_resid_pre)")
        ids = [self.model.bos_token_id if self.model.bos_token_id is not None else 0]
        shape = tuple(self.call(lambda: sae_math.hook_activation(self.bridge, ids, sae.hook)).shape[1:])
        if sae.head is not None and not (len(shape) == 2 and 0 <= sae.head < shape[0]):
            raise ModelLoadError(f"SAE {sae.name!r}: hook_head_index {sae.head} is not a head of {sae.hook} "
                                 f"(activation shape {shape})")
        width = math.prod(shape[1:] if sae.head is not None else shape)
        if width != sae.d_in:
            raise ModelLoadError(f"SAE {sae.name!r} has d_in {sae.d_in}, but {sae.hook} of model "
                                 f"{self.model.name!r} is {width} wide; it was trained on another model or hook")
        self.saes[sae.name] = dataclasses.replace(
            sae, model=self.model.name, params={n: t.to(self.cfg.device) for n, t in sae.params.items()})

    def info(self) -> dict[str, Any]:
        """`GET /model`: the model's description, the Jacobian lenses it can load and the SAEs it serves."""
        return {**self.model.info(), "lenses_available": jlens.available(self.model, self.lens_dir),
                "saes": [sae.info() for sae in self.saes.values()]}

    def describe(self) -> dict[str, Any]:
        """The model part of an answer's provenance: the model's, with the SAEs it serves and their
        sources when it serves any (so a replay can load them again)."""
        described = self.model.describe()
        if self.saes:
            described["saes"] = {name: {"hook": sae.hook, "source": sae.source} for name, sae in self.saes.items()}
        return described

    def sae(self, name: str) -> SAE:
        """The SAE `name`; 400 listing the SAEs this model serves otherwise."""
        found = self.saes.get(name)
        if found is None:
            served = ", ".join(map(repr, self.saes)) or "none (start the server with --sae)"
            raise InvalidRequest(f"sae {name!r} is not loaded on model {self.model.name!r}; loaded SAEs: {served}")
        return found

    def encoded(self, text: Text, sae: SAE) -> sae_math.Encoded:
        """`text`'s features under `sae` and the reconstruction's quality (cached per text and SAE)."""
        return self.cached(cache_key("features", text, sae.name),
                           lambda: sae_math.encoded(sae, self.hook_activation(text, sae.hook)))

    def acts(self, text: Text) -> replay.Acts:
        """The cached activations of `text` for causal work (`replay.capture`)."""
        ids, _ = self.tokens(text)
        return self.cached(cache_key("acts", text),
                           lambda: self._measured(lambda: replay.capture(self.bridge, ids), [len(ids)]))


class Models:
    """The loaded models by name, each with its own explorer: its own worker thread, so a slow
    request on one model never waits for another model's work, and its own cache, all caches
    sharing one byte bound (`CacheBudget`). The first is the default for requests that name none."""

    def __init__(self, explorers: Sequence[Explorer]) -> None:
        if not explorers:
            raise ValueError("at least one model is needed")
        self.by_name = {ex.model.name: ex for ex in explorers}
        if len(self.by_name) != len(explorers):
            raise ValueError("two loaded models have the same name")
        self.default = explorers[0]

    def get(self, name: str | None) -> Explorer:
        """The explorer of `name` (None: the default); 400 listing the loaded names otherwise."""
        if name is None:
            return self.default
        ex = self.by_name.get(name)
        if ex is None:
            raise InvalidRequest(f"model {name!r} is not loaded; loaded models: {', '.join(map(repr, self.by_name))}")
        return ex

    def describe(self) -> dict[str, Any]:
        return {"default": self.default.model.name, "models": [ex.info() for ex in self.by_name.values()]}
