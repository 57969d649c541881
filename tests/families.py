"""Tiny random models of every supported family, built offline, and plain-HF references on them.

`build(family, directory)` writes a 2-3 layer model of the family's real architecture class with
small widths (and the family's quirks: Pythia's parallel attention + MLP and partial rotary,
Llama's untied unembedding, Qwen3's grouped-query attention and QK-norm, Gemma 2's soft-capping
and sliding-window layers, BERT's bidirectional encoder) and the GPT-2 tokenizer with the
family's special tokens added, via `save_pretrained`. The server loads the directory through the
same path as `python app.py --model DIR`; the tests compare it with HF `transformers` loaded from
the same directory (eager attention).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from explorer.runtime.loading import gpt2_tokenizer

WIDTH = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 64}
INIT = 0.15  # larger than HF's 0.02, so attention patterns and predictions are far from uniform


@dataclass(frozen=True)
class Family:
    name: str
    config: Callable[[int, Any], Any]  # (vocab size, tokenizer) -> HF config
    model_class: str  # transformers class name
    causal: bool = True
    prepends_bos: bool = True  # index 0 is a start token the server adds (BOS; BERT: [CLS])
    specials: tuple[tuple[str, str], ...] = ()  # (tokenizer attribute, token) added to the GPT-2 tokenizer


def _ids(tok: Any) -> dict[str, Any]:
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def _gpt2(vocab: int, tok: Any) -> Any:
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab, n_layer=3, n_head=4, n_embd=64, n_positions=64,
                      initializer_range=INIT, **_ids(tok))


def _neox(vocab: int, tok: Any) -> Any:
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=vocab, num_hidden_layers=2, rotary_pct=0.25, use_parallel_residual=True,
                         tie_word_embeddings=False, initializer_range=INIT, **WIDTH, **_ids(tok))


def _llama(vocab: int, tok: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, num_hidden_layers=2, num_key_value_heads=4, tie_word_embeddings=False,
                       initializer_range=INIT, **WIDTH, **_ids(tok))


def _qwen3(vocab: int, tok: Any) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab, num_hidden_layers=2, num_key_value_heads=2, head_dim=16,
                       tie_word_embeddings=True, initializer_range=INIT, **WIDTH, **_ids(tok))


def _gemma2(vocab: int, tok: Any) -> Any:
    from transformers import Gemma2Config

    # sliding_window 4 < the test texts' length, so the sliding layers' mask matters
    return Gemma2Config(vocab_size=vocab, num_hidden_layers=3, num_key_value_heads=2, head_dim=16,
                        sliding_window=4, final_logit_softcapping=5.0, attn_logit_softcapping=10.0,
                        query_pre_attn_scalar=16, initializer_range=INIT, **WIDTH, **_ids(tok))


def _bert(vocab: int, tok: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab, num_hidden_layers=2, initializer_range=INIT, pad_token_id=tok.pad_token_id,
                      **WIDTH)


FAMILIES = {f.name: f for f in [
    Family("gpt2", _gpt2, "GPT2LMHeadModel"),
    Family("gpt-neox", _neox, "GPTNeoXForCausalLM", prepends_bos=False),
    Family("llama", _llama, "LlamaForCausalLM", specials=(("bos_token", "<s>"), ("eos_token", "</s>"))),
    Family("qwen3", _qwen3, "Qwen3ForCausalLM", prepends_bos=False,
           specials=(("bos_token", None), ("eos_token", "<|im_end|>"), ("pad_token", "<|endoftext|>"))),
    Family("gemma2", _gemma2, "Gemma2ForCausalLM",
           specials=(("bos_token", "<bos>"), ("eos_token", "<eos>"), ("pad_token", "<pad>"))),
    Family("bert", _bert, "BertForMaskedLM", causal=False,
           specials=(("bos_token", None), ("eos_token", None), ("unk_token", "[UNK]"), ("cls_token", "[CLS]"),
                     ("sep_token", "[SEP]"), ("mask_token", "[MASK]"), ("pad_token", "[PAD]"))),
]}


def tokenizer(family: Family) -> Any:
    """The GPT-2 tokenizer with the family's special tokens (None: the family has no such token)."""
    tok = gpt2_tokenizer()
    for attr, token in family.specials:
        if token is None:
            setattr(tok, attr, None)
        else:
            tok.add_special_tokens({attr: token})
    return tok


def build(name: str, directory: str, seed: int = 0) -> None:
    """Write a tiny seeded random model of family `name` and its tokenizer to `directory`."""
    import transformers

    family = FAMILIES[name]
    tok = tokenizer(family)
    cfg = family.config(len(tok), tok)
    torch.manual_seed(seed)
    model = getattr(transformers, family.model_class)(cfg).eval()
    model.save_pretrained(directory)
    tok.save_pretrained(directory)


def hf_model(name: str, directory: str) -> Any:
    import transformers

    cls = getattr(transformers, FAMILIES[name].model_class)
    return cls.from_pretrained(directory, attn_implementation="eager").eval()


def _first(obj: Any, paths: tuple[str, ...]) -> Any:
    """The first of the dotted attribute `paths` that `obj` has."""
    for path in paths:
        found = obj
        try:
            for part in path.split("."):
                found = getattr(found, part)
        except AttributeError:
            continue
        return found
    raise AttributeError(f"{type(obj).__name__} has none of {paths}")


def hf_layers(hf: Any) -> Any:
    """The model's blocks (a ModuleList) in any of the families."""
    return _first(hf.base_model, ("h", "layers", "encoder.layer"))


def hf_readout(hf: Any, hidden: torch.Tensor, softcap: bool = True) -> torch.Tensor:
    """Logits of block outputs [..., d_model] the textbook way: the final norm and the unembedding
    (Gemma 2's final soft-cap unless `softcap` is False); BERT: its masked-LM head."""
    if hasattr(hf, "cls"):
        return hf.cls(hidden)
    norm = _first(hf.base_model, ("ln_f", "final_layer_norm", "norm"))
    logits = hf.get_output_embeddings()(norm(hidden))
    cap = getattr(hf.config, "final_logit_softcapping", None)
    if softcap and cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def hf_o_proj(layer: Any) -> Any:
    """The attention output projection of one block (its input is every head's z, head-major)."""
    return _first(layer, ("attn.c_proj", "attention.dense", "self_attn.o_proj", "attention.output.dense"))
