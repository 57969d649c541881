"""POST /generate: the model writes, one token per chunk of worker time, and every step says what
it chose, how sure it was (log-probability, entropy) and what else it considered."""
from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr

import torch

from ..errors import InvalidRequest
from ..math import steering
from ..math.generation import Decoder, Sampling, Step
from ..math.steps import Steps
from ..session import Explorer, cache_key
from . import precision
from .base import (Cost, StreamRequest, TokenSpec, admit, check_count, check_positions, check_seed, forward_work,
                   operation, require_causal, shape, token_id)
from .steering_vector import ActAddVector as ActAdd, Planned, SteerAddition, plan

MAX_NEW_TOKENS = 1024
MAX_ALTERNATIVES = 20
MAX_STOP_STRINGS = 16
MAX_TEMPERATURE = 100.0
MAX_ADDITIONS = 8
MAX_WATCHED = 16


class GenerateRequest(StreamRequest):
    prompt: Optional[StrictStr] = Field(default=None, min_length=1, description=(
        "The text to continue; BOS is prepended where the model uses one (as for every text). "
        "Give prompt or prompt_ids."))
    prompt_ids: Optional[list[StrictInt]] = Field(default=None, description=(
        "The token ids to continue, taken as given (no BOS added): e.g. a previous answer's token_ids."))
    max_new_tokens: StrictInt = Field(default=32, description=(
        f"Tokens to generate at most, 1 .. {MAX_NEW_TOKENS}; prompt + new tokens must fit in n_ctx."))
    do_sample: StrictBool = Field(default=False, description="false: greedy (the most likely token); true: sample.")
    temperature: float = Field(default=1.0, description=(
        f"Sampling temperature, > 0 and at most {MAX_TEMPERATURE:g} (do_sample only)."))
    top_k: Optional[StrictInt] = Field(default=None, description="Sample among the k most likely tokens only, k >= 1.")
    top_p: Optional[float] = Field(default=None, description=(
        "Sample among the most likely tokens whose probability reaches top_p, 0 < top_p <= 1."))
    seed: StrictInt = Field(default=0, description="Seed of the sampler; the same seed gives the same completion.")
    stop: Optional[list[StrictStr]] = Field(default=None, description=(
        f"Strings that end the generation once the generated text contains one (it is kept), 1 .. "
        f"{MAX_STOP_STRINGS} non-empty strings."))
    alternatives: StrictInt = Field(default=5, description=(
        f"The most likely tokens listed at every step, 0 .. {MAX_ALTERNATIVES}."))
    watch: Optional[list[TokenSpec]] = Field(default=None, description=(
        f"1 .. {MAX_WATCHED} tokens (one-token strings or ids) whose probability every step reports "
        "(`watched`), e.g. a sentiment word while sweeping a steering coefficient."))
    steer: Optional[list[SteerAddition]] = Field(default=None, description=(
        f"1 .. {MAX_ADDITIONS} vectors added to the residual stream at every forward pass (prompt and "
        "every step), each at its layer, site and positions."))
    compare: StrictBool = Field(default=False, description=(
        "With steer: also the unsteered completion from the same seed, and per step the KL divergence "
        "KL(steered || unsteered) of the next-token distributions on the steered sequence."))


class Alternative(BaseModel):
    token: str
    token_id: int
    probability: float


class GeneratedToken(BaseModel):
    position: int = Field(description="Its index in token_ids.")
    token: str
    token_id: int
    logprob: float = Field(description="Its log-probability under the model's own next-token distribution "
                                       "(temperature 1, whatever the sampling temperature).")
    entropy: float = Field(description="Entropy of that distribution, in nats.")
    alternatives: list[Alternative] = Field(description="The most likely tokens of that distribution.")
    watched: Optional[list[Alternative]] = Field(default=None, description=(
        "With watch: each watched token's probability in that distribution."))


class PromptToken(BaseModel):
    index: int
    token: str
    token_id: int


class Prompted(BaseModel):
    prompt: list[PromptToken]


class Completion(BaseModel):
    generated: list[GeneratedToken]
    finish_reason: Literal["length", "eos", "stop"] = Field(description=(
        "length: max_new_tokens were generated; eos: the model wrote its end-of-sequence token "
        "(kept as the last token); stop: the generated text contains a stop string."))
    token_ids: list[int] = Field(description="The whole sequence: prompt, then the generated tokens.")
    text: str = Field(description="The whole sequence's text, special tokens left out.")
    completion: str = Field(description="The generated tokens' text, special tokens left out.")


class SteeringApplied(BaseModel):
    layer: int
    site: str
    kind: str
    coefficient: float
    unit: bool
    positions: Union[str, list[int]] = Field(description='"all", "prompt", "generated", a list, or "first N" (actadd).')
    norm: Union[float, list[float]] = Field(description="The added vector's norm (coefficient and unit applied; "
                                                        "one per row for actadd).")


class GenerateResponse(Completion, Prompted):  # prompt first, then the completion's fields
    steering: Optional[list[SteeringApplied]] = Field(default=None, description="With steer: what was added.")
    unsteered: Optional[Completion] = Field(default=None, description=(
        "With compare: the completion without steering, from the same seed."))
    kl: Optional[list[float]] = Field(default=None, description=(
        "With compare: per generated step of the steered sequence, KL(steered || unsteered) of the two "
        "next-token distributions at its prefix (nats, 6 decimals)."))


def sampling(req: GenerateRequest) -> Sampling:
    """The request's sampling settings, checked (400 naming the field otherwise)."""
    check_seed(req.seed)
    if not 0.0 < req.temperature <= MAX_TEMPERATURE:
        raise InvalidRequest(f"temperature must be above 0 and at most {MAX_TEMPERATURE:g}, got {req.temperature}")
    if req.top_k is not None and req.top_k < 1:
        raise InvalidRequest(f"top_k must be at least 1, got {req.top_k}")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise InvalidRequest(f"top_p must be above 0 and at most 1, got {req.top_p}")
    if not req.do_sample and (req.temperature != 1.0 or req.top_k is not None or req.top_p is not None):
        raise InvalidRequest("temperature, top_k and top_p apply only with do_sample: true (greedy decoding "
                             "takes the most likely token)")
    return Sampling(req.do_sample, req.temperature, req.top_k, req.top_p, req.seed)


def prompt_ids(ex: Explorer, req: GenerateRequest) -> tuple[tuple[int, ...], tuple[str, ...]]:
    if (req.prompt is None) == (req.prompt_ids is None):
        raise InvalidRequest("give either prompt (a text) or prompt_ids (token ids), not both and not neither")
    if req.prompt is not None:
        return ex.tokens(req.prompt)
    return ex.given_ids("prompt_ids", req.prompt_ids)


def token_json(ex: Explorer, position: int, step: Step, watch: list[int]) -> dict:
    vocab = ex.vocab_strs

    def listed(ids: list[int], probs: list[float]) -> list[dict]:
        return [{"token": vocab[i], "token_id": i, "probability": precision.probability(p)} for i, p in zip(ids, probs)]
    out = {"position": position, "token": vocab[step.token_id], "token_id": step.token_id,
           "logprob": precision.log_value(step.logprob), "entropy": precision.log_value(step.entropy),
           "alternatives": listed(step.top_ids, step.top_probs)}
    if watch:
        out["watched"] = listed(watch, step.logprobs[watch].exp().tolist())
    return out


def where_added(planned: Planned, rows: int, prompt: int, total: int, index: int) -> tuple[Callable, Any]:
    """`at(p)` of one addition (the row added at absolute position p, or None) and its description."""
    spec = planned.spec
    positions = spec.positions
    if isinstance(spec.vector, ActAdd):
        if positions is not None:
            raise InvalidRequest(f"steer[{index}].positions: an actadd vector is added at the first positions, one "
                                 "per row of its contrast; leave positions out")
        return (lambda p: p if p < rows else None), f"first {rows}"
    positions = positions or "all"
    if positions == "all":
        return (lambda p: 0), positions
    if positions == "prompt":
        return (lambda p: 0 if p < prompt else None), positions
    if positions == "generated":
        return (lambda p: 0 if p >= prompt else None), positions
    chosen = set(check_positions(f"steer[{index}].positions", positions, total))
    return (lambda p: 0 if p in chosen else None), sorted(chosen)


# Characters at the start of a decoded tail of tokens that may differ from the whole text there: the
# rest of a character whose first bytes were cut off (up to 3 replacement characters), a leading
# space a SentencePiece decoder drops.
TAIL_SLACK = 4


def stop_in_tail(decode: Callable[[list[int]], str], ids: list[int], stops: list[str]) -> bool:
    """Whether decode(ids) contains a stop string, decoding only a tail of `ids` (the whole text
    each step would be quadratic). Exact when called after every token, as Writer does: the text
    before the newest token held none, so a new one ends where the newest token changed the text
    (its characters, and up to TAIL_SLACK before them that a completed multi-byte character
    replaces), at most the longest stop string from the end of that."""
    need = max(map(len, stops)) + len(decode(ids[-1:])) + 2 * TAIL_SLACK
    n = 1
    while True:
        n = min(2 * n, len(ids))  # doubling: a few decodes of at most twice the tokens needed
        text = decode(ids[-n:])
        if n == len(ids):
            return any(s in text for s in stops)
        if len(text) >= need:
            return any(s in text[TAIL_SLACK:] for s in stops)


class Writer:
    """One completion being written: its decoder, its steps as answered, why it ended."""

    def __init__(self, ex: Explorer, decoder: Decoder, eos: frozenset[int], stops: list[str],
                 watch: list[int]) -> None:
        self.ex, self.decoder, self.eos, self.stops, self.watch = ex, decoder, eos, stops, watch
        self.prompt = len(decoder.ids)
        self.generated: list[dict] = []
        self.reason: str | None = None
        self.last: Step | None = None

    def advance(self, forced: Optional[int] = None) -> dict:
        step = self.last = self.decoder.step(forced)
        event = token_json(self.ex, len(self.decoder.ids) - 1, step, self.watch)
        self.generated.append(event)
        if step.token_id in self.eos:
            self.reason = "eos"
        elif self.stops and stop_in_tail(self.ex.decode, self.decoder.ids[self.prompt:], self.stops):
            self.reason = "stop"
        return event

    def answer(self) -> dict:
        ids = self.decoder.ids
        return {"generated": self.generated, "finish_reason": self.reason or "length", "token_ids": ids,
                "text": self.ex.decode(ids), "completion": self.ex.decode(ids[self.prompt:])}


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """KL(p || q) of two log-probability rows, in nats (0 log 0 = 0)."""
    return float((p.exp() * (p - q)).nan_to_num().sum())


@operation("/generate", GenerateRequest, GenerateResponse,
           "Generate a continuation token by token: each step's token, log-probability, entropy and "
           "alternatives, optionally steered by vectors added to the residual stream; streamed as "
           "server-sent events with \"stream\": true.", mode="steps")
def generate(ex: Explorer, req: GenerateRequest) -> Steps:
    require_causal(ex, "POST /generate")
    ids, strs = prompt_ids(ex, req)
    settings = sampling(req)
    if not 1 <= req.max_new_tokens <= MAX_NEW_TOKENS:
        raise InvalidRequest(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, got {req.max_new_tokens}")
    if len(ids) + req.max_new_tokens > ex.n_ctx:
        raise InvalidRequest(f"the prompt is {len(ids)} tokens and max_new_tokens {req.max_new_tokens}: together "
                             f"over the model's context of {ex.n_ctx} tokens (n_ctx); ask for at most "
                             f"{max(ex.n_ctx - len(ids), 0)} new tokens")
    if not 0 <= req.alternatives <= MAX_ALTERNATIVES:
        raise InvalidRequest(f"alternatives must be between 0 and {MAX_ALTERNATIVES}, got {req.alternatives}")
    stops = list(req.stop or [])
    if req.stop is not None:
        check_count("stop", stops, MAX_STOP_STRINGS, "strings")
        if not all(stops):
            raise InvalidRequest("stop must not contain an empty string")
    if req.watch is not None:
        check_count("watch", req.watch, MAX_WATCHED, "tokens")
    watch = [token_id(ex, f"watch[{i}]", t) for i, t in enumerate(req.watch or [])]
    if req.steer is not None:
        check_count("steer", req.steer, MAX_ADDITIONS, "additions")
    if req.compare and not req.steer:
        raise InvalidRequest("compare needs steer: it sets the steered completion beside the unsteered one")
    planned = [plan(ex, a, f"steer[{i}].") for i, a in enumerate(req.steer or [])]
    total = len(ids) + req.max_new_tokens
    for i, p in enumerate(planned):  # positions are checked now (actadd's rows are counted once built)
        where_added(p, 1, len(ids), total, i)
    n_layers = int(ex.cfg.n_layers)
    # the prompt's pass, then one position per new token (three passes each when comparing), and
    # the vectors' prompts; the KV caches are the memory that grows
    passes = 3 if req.compare else 1
    kv_bytes = passes * 2 * n_layers * total * int(ex.cfg.d_model) * 4
    work = passes * (forward_work(n_layers, len(ids)) + req.max_new_tokens * n_layers) + sum(p.passes for p in planned)
    admit(ex, Cost(work, total, kv_bytes), req.run_async, "ask for fewer new tokens or a shorter prompt")
    eos = ex.model.eos_token_ids

    def steps() -> Steps:
        additions, applied = [], []
        for i, p in enumerate(planned):
            vector = yield from p.build()
            rows = vector[None] if vector.dim() == 1 else vector
            at, described = where_added(p, rows.shape[0], len(ids), total, i)
            additions.append(steering.Addition(steering.hook_name(p.layer, p.site), rows.to(ex.cfg.device), at))
            norms = rows.norm(dim=-1).tolist()
            applied.append({"layer": p.layer, "site": p.site, "kind": p.spec.vector.kind,
                            "coefficient": p.spec.coefficient, "unit": p.spec.unit, "positions": described,
                            "norm": [precision.log_value(n) for n in norms] if vector.dim() == 2
                            else precision.log_value(norms[0])})
        steer = steering.steer(additions) if additions else None
        main = Writer(ex, Decoder(ex.bridge, ids, settings, req.alternatives, steer), eos, stops, watch)
        plain = Writer(ex, Decoder(ex.bridge, ids, settings, req.alternatives), eos, stops, watch) if req.compare else None
        follow = Decoder(ex.bridge, ids, settings, 0) if req.compare else None  # unsteered, on the steered tokens
        kl: list[float] = []
        writers = [w for w in (main, plain) if w is not None]
        try:
            for k in range(req.max_new_tokens):
                update: dict[str, Any] = {"progress": (k + 1) / req.max_new_tokens}
                if main.reason is None:
                    update["generated"], update["token"] = k + 1, main.advance()
                    if follow is not None:
                        kl.append(precision.log_value(kl_divergence(main.last.logprobs,
                                                                    follow.step(main.last.token_id).logprobs)))
                        update["kl"] = kl[-1]
                if plain is not None and plain.reason is None:
                    update["unsteered_token"] = plain.advance()
                # one chunk per token: a streamed token is sent before the next one is computed
                yield update
                if all(w.reason is not None for w in writers):
                    break
        finally:
            for decoder in [w.decoder for w in writers] + ([follow] if follow else []):
                decoder.close()
        # the whole sequence's (unsteered) run, cached at idle time: the other endpoints then read
        # `token_ids` from the cache, as any text
        sequence = tuple(main.decoder.ids)
        ex.worker.submit_idle(cache_key("run", sequence), lambda: ex.run(sequence))
        return shape(GenerateResponse, **main.answer(),
                     prompt=[{"index": i, "token": t, "token_id": d} for i, (d, t) in enumerate(zip(ids, strs))],
                     **({"steering": applied} if applied else {}),
                     **({"unsteered": plain.answer(), "kl": kl} if plain else {}))

    return steps()
