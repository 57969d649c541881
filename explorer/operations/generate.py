"""POST /generate: the model writes, one token per chunk of worker time, and every step says what
it chose, how sure it was (log-probability, entropy) and what else it considered."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr

from ..errors import InvalidRequest
from ..math.generation import Decoder, Sampling, Step
from ..math.steps import Steps
from ..session import Explorer
from . import precision
from .base import Cost, StreamRequest, admit, check_count, check_seed, forward_work, operation, require_causal, shape

MAX_NEW_TOKENS = 1024
MAX_ALTERNATIVES = 20
MAX_STOP_STRINGS = 16
MAX_TEMPERATURE = 100.0
FINISH_REASONS = ("length", "eos", "stop")


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


class PromptToken(BaseModel):
    index: int
    token: str
    token_id: int


class GenerateResponse(BaseModel):
    prompt: list[PromptToken]
    generated: list[GeneratedToken]
    finish_reason: Literal["length", "eos", "stop"] = Field(description=(
        "length: max_new_tokens were generated; eos: the model wrote its end-of-sequence token "
        "(kept as the last token); stop: the generated text contains a stop string."))
    token_ids: list[int] = Field(description="The whole sequence: prompt, then the generated tokens.")
    text: str = Field(description="The whole sequence's text, special tokens left out.")
    completion: str = Field(description="The generated tokens' text, special tokens left out.")


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


def token_json(ex: Explorer, position: int, step: Step) -> dict:
    vocab = ex.vocab_strs
    return {"position": position, "token": vocab[step.token_id], "token_id": step.token_id,
            "logprob": precision.log_value(step.logprob), "entropy": precision.log_value(step.entropy),
            "alternatives": [{"token": vocab[i], "token_id": i, "probability": precision.probability(p)}
                             for i, p in zip(step.top_ids, step.top_probs)]}


@operation("/generate", GenerateRequest, GenerateResponse,
           "Generate a continuation token by token: each step's token, log-probability, entropy and "
           "alternatives; streamed as server-sent events with \"stream\": true.", mode="steps")
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
    n_layers, total = int(ex.cfg.n_layers), len(ids) + req.max_new_tokens
    # the prompt's pass, then one position per new token; the KV cache is the memory that grows
    kv_bytes = 2 * n_layers * total * int(ex.cfg.d_model) * 4
    admit(ex, Cost(forward_work(n_layers, len(ids)) + req.max_new_tokens * n_layers, total, kv_bytes),
          req.run_async, "ask for fewer new tokens or a shorter prompt")
    eos = ex.model.eos_token_ids

    def steps() -> Steps:
        decoder = Decoder(ex.bridge, ids, settings, req.alternatives)
        generated: list[dict] = []
        reason = "length"
        try:
            for k in range(req.max_new_tokens):
                step = decoder.step()
                event = token_json(ex, len(ids) + k, step)
                generated.append(event)
                if step.token_id in eos:
                    reason = "eos"
                elif stops and any(s in ex.decode(decoder.ids[len(ids):]) for s in stops):
                    reason = "stop"
                # one chunk per token: a streamed token is sent before the next one is computed
                yield {"progress": (k + 1) / req.max_new_tokens, "generated": k + 1, "token": event}
                if reason != "length":
                    break
        finally:
            decoder.close()
        return shape(GenerateResponse,
                     prompt=[{"index": i, "token": t, "token_id": d} for i, (d, t) in enumerate(zip(ids, strs))],
                     generated=generated, finish_reason=reason, token_ids=decoder.ids,
                     text=ex.decode(decoder.ids), completion=ex.decode(decoder.ids[len(ids):]))

    return steps()
