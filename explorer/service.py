"""`Explorer`: one loaded model, its worker thread and cache, and the operations behind each endpoint."""
from __future__ import annotations

import functools
import threading
from typing import Any, Sequence

from . import analysis, lens, replay
from .analysis import InvalidRequest
from .engine import DEFAULT_CACHE_BYTES, DEFAULT_QUEUE_SIZE, ByteLRU, CacheBudget, ModelWorker, Run
from .loading import LoadedModel
from .targets import Target, TokenSpec, parse_target

TOKENIZE_CACHE_ENTRIES = 512
# After a /predict, idle time computes the lens of this many positions nearest the asked one, so
# clicking through positions is served from cache. One position per idle job: a request waits
# for one lens projection at most.
PREFETCH_POSITIONS = 64


class Models:
    """The loaded models by name, each with its own explorer: its own worker thread, so a slow
    request on one model never waits for another model's work, and its own cache, all caches
    sharing one byte bound (`CacheBudget`). The first is the default for requests that name none."""

    def __init__(self, explorers: Sequence["Explorer"]) -> None:
        if not explorers:
            raise ValueError("at least one model is needed")
        self.by_name = {ex.model.name: ex for ex in explorers}
        if len(self.by_name) != len(explorers):
            raise ValueError("two loaded models have the same name")
        self.default = explorers[0]

    def get(self, name: str | None) -> "Explorer":
        """The explorer of `name` (None: the default); 400 listing the loaded names otherwise."""
        if name is None:
            return self.default
        ex = self.by_name.get(name)
        if ex is None:
            raise InvalidRequest(f"model {name!r} is not loaded; loaded models: {', '.join(map(repr, self.by_name))}")
        return ex

    def describe(self) -> dict[str, Any]:
        return {"default": self.default.model.name, "models": [ex.model.info() for ex in self.by_name.values()]}


class Explorer:
    """Everything the endpoints need; every method is safe to call from many request threads."""

    def __init__(self, model: LoadedModel, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 queue_size: int = DEFAULT_QUEUE_SIZE, budget: CacheBudget | None = None) -> None:
        """`budget`: a byte bound shared with other models' explorers (default: its own of `cache_bytes`)."""
        self.model = model
        self.worker = ModelWorker(queue_size, model.lock)
        self.cache = ByteLRU(self.worker, cache_bytes, budget=budget)
        # HF fast tokenizers mutate their backend's padding/truncation state on every call.
        self._tokenizer_lock = threading.Lock()
        self.tokens = functools.lru_cache(maxsize=TOKENIZE_CACHE_ENTRIES)(self._tokens)

    @property
    def objective(self) -> str:
        """What the lens reads at a position: the next token (causal), or the token at that
        position as a masked-LM head would fill it (an encoder)."""
        return "next_token" if self.model.causal else "masked"

    @property
    def n_ctx(self) -> int:
        return int(self.model.cfg.n_ctx)

    def _tokens(self, text: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """Token ids, with the special tokens the model expects around a text (`special_ids`:
        BOS first where the model uses one; BERT's `[CLS] ... [SEP]`), and each token's decoded string."""
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

    def text_positions(self, seq: int) -> range:
        """The positions of the text's own tokens in a tokenized text of length `seq`."""
        before, after = self.model.special_ids
        return range(len(before), seq - len(after))

    def require_causal(self, endpoint: str) -> None:
        """400 for endpoints whose metric is a next-token prediction when the model is an encoder."""
        if not self.model.causal:
            raise InvalidRequest(
                f"model {self.model.name!r} is an encoder ({self.model.family}: bidirectional attention, "
                f"masked-token objective); {endpoint} needs a causal (next-token) model")

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Character span [begin, end) of each of `text`'s tokens (special tokens excluded)."""
        with self._tokenizer_lock:
            enc = self.model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [tuple(span) for span in enc["offset_mapping"]]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens."""
        with self._tokenizer_lock:
            return self.model.tokenizer.encode(text, add_special_tokens=False)

    def target(self, answer: TokenSpec, distractor: TokenSpec | None) -> Target:
        """A validated target (`targets.parse_target`) in this model's vocabulary."""
        return parse_target(answer, distractor, self.encode, lambda i: self.vocab_strs[i],
                            int(self.model.cfg.d_vocab))

    @functools.cached_property
    def vocab_strs(self) -> list[str]:
        """Decoded string of every vocabulary id (for lens predictions), computed once."""
        tok = self.model.tokenizer
        with self._tokenizer_lock:
            return tok.batch_decode([[i] for i in range(int(self.model.cfg.d_vocab))])

    def run(self, text: str) -> Run:
        """The cached forward pass of `text` (computed once, shared by every endpoint)."""
        ids, _ = self.tokens(text)
        bridge = self.model.bridge
        return self.cache.get_or_compute(("run", text), lambda: analysis.forward(bridge, ids))

    def acts(self, text: str) -> replay.Acts:
        """The cached activations of `text` for causal work (`replay.capture`)."""
        ids, _ = self.tokens(text)
        return self.cache.get_or_compute(("acts", text), lambda: replay.capture(self.model.bridge, ids))

    # --- one method per endpoint --------------------------------------------------------------

    def tokenize(self, text: str) -> dict[str, Any]:
        ids, strs = self.tokens(text)
        return {"tokens": [{"index": i, "token_id": t, "token_str": s}
                           for i, (t, s) in enumerate(zip(ids, strs))]}

    def trace(self, text: str, token_indices: Sequence[int] | None) -> dict[str, Any]:
        _, strs = self.tokens(text)
        indices = analysis.check_token_indices(token_indices, len(strs), int(self.model.cfg.n_layers),
                                               self.text_positions(len(strs)))
        run = self.run(text)
        pca = self.cache.get_or_compute(("trace", text, tuple(indices)), lambda: analysis.trace_pca(run, indices))
        result = analysis.trace(pca, indices)
        return {"tokens": [{"index": i, "token_str": strs[i]} for i in indices], **result}

    def attention(self, text: str, layer: int, head: int | None, precision: str = "compact") -> dict[str, Any]:
        ids, strs = self.tokens(text)
        cfg = self.model.cfg
        analysis.check_index("layer", layer, int(cfg.n_layers))
        if head is not None:
            analysis.check_index("head", head, int(cfg.n_heads))
        analysis.check_choice("precision", precision, ("compact", "full"))
        if precision == "full":
            bridge = self.model.bridge
            pattern = self.cache.get_or_compute(("pattern32", text, layer),
                                                lambda: analysis.layer_pattern(bridge, ids, layer))
            matrix = pattern if head is None else pattern[head]
        else:
            matrix = analysis.attention(self.run(text), layer, head)
        return {
            "attention_matrix": matrix,
            "layer": layer,
            "head": head,
            "n_heads": int(cfg.n_heads),
            "n_layers": int(cfg.n_layers),
            "tokens": list(strs),
        }

    def predict(self, text: str, token_index: int, top_k: int) -> dict[str, Any]:
        ids, strs = self.tokens(text)
        analysis.check_index("token_index", token_index, len(ids))
        if not 1 <= top_k <= analysis.LENS_TOP_K_MAX:
            raise InvalidRequest(f"top_k must be between 1 and {analysis.LENS_TOP_K_MAX}, got {top_k}")
        top_k = min(top_k, int(self.model.cfg.d_vocab))
        run = self.run(text)
        bridge = self.model.bridge
        lens = self.cache.get_or_compute(("lens", text, token_index),
                                         lambda: analysis.lens_top_k(bridge, run, token_index))
        self._prefetch_lens(text, token_index, len(ids))
        return {
            "token_index": token_index,
            "token_str": strs[token_index],
            "objective": self.objective,
            "predictions_by_layer": analysis.predictions(lens, top_k, self.vocab_strs),
        }

    def _prefetch_lens(self, text: str, position: int, seq: int) -> None:
        """Queue idle-time lens computations for the positions nearest `position` not cached yet."""
        for p in sorted(range(seq), key=lambda p: (abs(p - position), p))[:PREFETCH_POSITIONS]:
            if self.cache.get(("lens", text, p)) is None:
                self.worker.submit_idle(("lens", text, p), lambda p=p: self._fill_lens(text, p))

    def _fill_lens(self, text: str, position: int) -> None:
        """Idle job: cache the lens at `position` unless it is there or the run was evicted."""
        run = self.cache.get(("run", text))
        if run is not None and self.cache.get(("lens", text, position)) is None:
            self.cache.fill(("lens", text, position), analysis.lens_top_k(self.model.bridge, run, position))

    # --- reading the prediction (explorer/lens.py) --------------------------------------------

    def lens(self, text: str, positions: Sequence[int] | None = None, target: TokenSpec | None = None,
             top_k: int = 1) -> dict[str, Any]:
        return lens.lens(self, text, positions, target, top_k)

    def score(self, texts: Sequence[str], temperature: float = 1.0, top_k: int = 5) -> dict[str, Any]:
        return lens.score(self, texts, temperature, top_k)

    def dla(self, text: str, answer: TokenSpec, distractor: TokenSpec | None = None,
            position: int | None = None) -> dict[str, Any]:
        return lens.dla(self, text, answer, distractor, position)
