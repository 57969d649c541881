"""Generation one token at a time with the KV cache, so the worker can serve other requests
between steps: each `Decoder.step()` is one forward pass of the new token (the prompt's whole
pass on the first), with the bridge's hooks (steering) attached for that call only.

Each step reports the chosen token, its log-probability and the entropy of the model's own
next-token distribution (temperature 1, whatever the sampling temperature), and the top
alternatives under that distribution. Greedy decoding is `argmax` of the logits, as Hugging
Face's `generate`; sampling applies temperature, then top-k, then top-p (Hugging Face's order
and semantics) and draws with a seeded CPU generator, so one seed reproduces a completion
bit for bit on any device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .forward import Hook

Steer = Callable[[int], Sequence[tuple[str, Hook]]]  # offset of the chunk's first position -> hooks


@dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0


@dataclass
class Step:
    token_id: int
    logprob: float  # log P(token) at temperature 1
    entropy: float  # nats, of the temperature-1 distribution
    top_ids: list[int]
    top_probs: list[float]
    logprobs: torch.Tensor  # [d_vocab] float32 log-probabilities at temperature 1 (for comparisons)


def filtered(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Logits to sample from: divided by the temperature, then outside the top_k, then outside
    the smallest set whose probability reaches top_p, set to -inf (Hugging Face's warpers,
    applied in its order; the most likely token always stays)."""
    out = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < out.shape[-1]:
        kth = torch.topk(out, sampling.top_k).values[-1]
        out = out.masked_fill(out < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(out, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - sampling.top_p
        drop[-1] = False
        out = out.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return out


class Decoder:
    """One sequence being generated: its token ids, the KV cache and the sampler's generator."""

    def __init__(self, bridge: Any, prompt: Sequence[int], sampling: Sampling, alternatives: int,
                 steer: Steer | None = None) -> None:
        self.bridge = bridge
        self.ids = list(prompt)
        self.sampling = sampling
        self.alternatives = alternatives
        self.steer = steer
        self.generator = torch.Generator().manual_seed(sampling.seed)
        self._cache: Any = None
        self._pending: list[int] = list(prompt)  # fed to the next forward pass

    def _logits(self) -> torch.Tensor:
        """The last position's logits after feeding the pending tokens ([d_vocab], float32)."""
        bridge = self.bridge
        device = bridge.cfg.device
        offset = len(self.ids) - len(self._pending)
        tokens = torch.tensor([self._pending], dtype=torch.long, device=device)
        kwargs: dict[str, Any] = {"use_cache": True}
        if self._cache is not None:
            # as Hugging Face's generate: the whole mask, and the new token's position
            kwargs.update(past_key_values=self._cache,
                          attention_mask=torch.ones(1, len(self.ids), dtype=torch.long, device=device))
            if bridge._accepts_derived_position_ids():
                kwargs["position_ids"] = torch.tensor([[offset]], dtype=torch.long, device=device)
        hooks = list(self.steer(offset)) if self.steer else []
        # The bridge keeps the HF cache of a forward pass only while this flag is set: set it for
        # this pass alone, so passes of other requests between steps keep none.
        bridge._capture_hf_cache = True
        try:
            with bridge.hooks(fwd_hooks=hooks):
                logits = bridge(tokens, return_type="logits", **kwargs)
            self._cache = bridge.__dict__.pop("_last_hf_cache", None) or self._cache
        finally:
            bridge._capture_hf_cache = False
            bridge.__dict__.pop("_last_hf_cache", None)
        return logits[0, -1].float()

    def step(self, forced: int | None = None) -> Step:
        """Choose the next token (or take `forced`: the distribution of another sequence's prefix)
        and append it (one forward pass)."""
        logits = self._logits()
        logprobs = logits.log_softmax(-1)
        if forced is not None:
            token = forced
        elif self.sampling.do_sample:
            probs = filtered(logits, self.sampling).softmax(-1).cpu()
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        else:
            token = int(logits.argmax())
        probs = logprobs.exp()
        entropy = float(-(probs * logprobs).nan_to_num().sum())  # 0 * log 0 = 0
        top = torch.topk(logprobs, min(self.alternatives, logprobs.shape[-1]))
        self.ids.append(token)
        self._pending = [token]
        return Step(token, float(logprobs[token]), entropy, top.indices.tolist(),
                    top.values.exp().tolist(), logprobs)

    def close(self) -> None:
        """Drop the KV cache (it holds every layer's keys and values of the sequence)."""
        self._cache = None
