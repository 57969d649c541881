"""A model split layer by layer over CPU memory and disk offload (Accelerate `device_map`) answers
every endpoint as the same weights on one device do."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app import create_app
from explorer.runtime.loading import execution_device, parse_max_memory, placement
from model_utils import ModelLoadError, load_model
from tests.helpers import EVERY_ENDPOINT, TEXT, answer, max_diff

# Block 0 in CPU memory, blocks 1-2 and the final norm on disk: activations cross from the CPU
# part into disk-offloaded blocks, whose weights Accelerate loads for each call. GPT-2 ties its
# embedding to lm_head, so both stay together. The second map alternates, embedding on disk.
SPLITS = {
    "cpu-then-disk": {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu",
                      "transformer.h.0": "cpu", "transformer.h.1": "disk", "transformer.h.2": "disk",
                      "transformer.ln_f": "disk", "lm_head": "cpu"},
    "alternating": {"transformer.wte": "disk", "transformer.wpe": "disk", "transformer.drop": "cpu",
                    "transformer.h.0": "disk", "transformer.h.1": "cpu", "transformer.h.2": "disk",
                    "transformer.ln_f": "cpu", "lm_head": "disk"},
}


@pytest.fixture(scope="module", params=list(SPLITS))
def split_model(request, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return load_model(str(tiny_dir), device_map=SPLITS[request.param],
                      offload_dir=str(tmp_path_factory.mktemp("offload")))


@pytest.mark.slow  # Accelerate disk offload
def test_split_really_offloads(split_model):
    hf = split_model.bridge.original_model
    split = hf.hf_device_map
    assert split in SPLITS.values()
    assert split_model.info()["device"] == "+".join(dict.fromkeys(split.values()))  # cpu+disk or disk+cpu
    # disk blocks' weights are placeholders until a call materializes them (the bridge keeps its
    # own split q/k/v copies of the fused attention input in memory)
    for l, block in enumerate(hf.transformer.h):
        where = {p.device.type for p in block.mlp.parameters()}
        assert where == ({"meta"} if split[f"transformer.h.{l}"] == "disk" else {"cpu"})
        assert execution_device(block, "cuda") == torch.device("cpu")
    assert split_model.cfg.device == "cpu"  # where input ids go, even with the embedding on disk


@pytest.mark.slow  # Accelerate disk offload
def test_every_endpoint_matches_one_device(split_model, tiny_model):
    split = create_app({"TESTING": True}, model=split_model).test_client()
    single = create_app({"TESTING": True}, model=tiny_model).test_client()
    diffs = {}
    for path, body in EVERY_ENDPOINT:
        got, want = answer(split, path, body), answer(single, path, body)
        diffs[f"{path} {sorted(body.items())}"] = max_diff(got, want, path)
    worst = max(diffs.values())
    print(f"device-map split vs one device: {len(diffs)} requests, max |diff| {worst:.3g}")
    assert worst <= 1e-4, diffs
    # offloaded weights went back to their placeholders after every call
    assert {p.device.type for p in split_model.bridge.original_model.transformer.h[2].mlp.parameters()} == {"meta"}


def test_model_endpoint_and_options():
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=64GiB") == {0: "20GiB", 1: "20GiB", "cpu": "64GiB"}
    with pytest.raises(ModelLoadError, match="0=20GiB"):
        parse_max_memory("20GiB")
    assert placement({"a": 0, "b": 0, "c": "cpu", "d": "disk"}) == "cuda:0+cpu+disk"
    with pytest.raises(ModelLoadError, match="--device-map must be one of"):
        load_model("gpt2", device_map="everywhere")
    with pytest.raises(ModelLoadError, match="--random-weights"):
        load_model("gpt2", device_map="auto", random_weights=True)


def test_gpu_and_offload_mixed_is_refused_with_advice(tiny_dir: Path):
    """TransformerLens 4.3 refuses GPU + CPU/disk maps (MIXED_OFFLOAD_GPU_ERROR) before loading,
    even on a machine without a GPU; the error says what to do instead."""
    mixed = {**SPLITS["cpu-then-disk"], "transformer.h.0": 0}
    with pytest.raises(ModelLoadError, match="refuses to mix GPU layers with CPU or disk offload"):
        load_model(str(tiny_dir), device_map=mixed)


@pytest.mark.slow  # Accelerate disk offload
def test_auto_map_under_a_memory_budget(tiny_dir: Path, tmp_path: Path):
    """`--device-map auto --max-memory cpu=...` smaller than the model offloads the rest to disk."""
    model = load_model(str(tiny_dir), device_map="auto", max_memory={"cpu": "8MB"}, offload_dir=str(tmp_path))
    assert "disk" in model.device, model.bridge.original_model.hf_device_map
    client = create_app({"TESTING": True}, model=model).test_client()
    assert client.get("/model").get_json()["device"] == model.device
    assert client.post("/predict", json={"text": TEXT, "token_index": 2}).status_code == 200
