"""``megareweight export``: a checkpoint -> a Hugging Face LLaMA directory.

Writes ``model.safetensors`` + ``config.json`` (+ the run's tokenizer, ``tokenizer.model`` or
``tokenizer.json``, and a ``tokenizer_config.json`` naming its special tokens) that
``transformers.LlamaForCausalLM.from_pretrained`` loads. Our blocks use the same rotary convention
(rotate-half) and RMSNorm as Hugging Face's LLaMA, so the export is a renaming of tensors, not a
conversion.

``config.json``'s ``bos/eos/pad_token_id`` come from the run's tokenizer (the end-of-document
token is not id 1 for every tokenizer). Exporting into a directory that already holds an export
replaces every file the exporter owns (:data:`OWNED_FILES`) and removes the owned files this
export does not write: a stale ``tokenizer.json`` left beside a new ``tokenizer.model`` would be
what ``AutoTokenizer.from_pretrained`` loads. Other files in the directory are left alone.
"""
from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch

from megareweight.checkpoint_io import load_model, run_tokenizer
from megareweight.data.tokenizer import Tokenizer, load_tokenizer
from megareweight.model import ModelArgs

#: Every file an export writes; the ones a given export does not write are removed from --out.
OWNED_FILES = ("model.safetensors", "config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json")

_RENAMES = [
    (r"^embed\.weight$", "model.embed_tokens.weight"),
    (r"^norm\.weight$", "model.norm.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
    (r"^layers\.(\d+)\.attn_norm\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^layers\.(\d+)\.ffn_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"^layers\.(\d+)\.attn\.(q|k|v|o)_proj\.weight$", r"model.layers.\1.self_attn.\2_proj.weight"),
    (r"^layers\.(\d+)\.ffn\.(gate|up|down)_proj\.weight$", r"model.layers.\1.mlp.\2_proj.weight"),
]


def hf_name(name: str) -> str:
    for pattern, replacement in _RENAMES:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    raise KeyError(f"no Hugging Face name for parameter {name!r}")


def special_token_ids(tokenizer: Optional[Tokenizer]) -> dict[str, Optional[int]]:
    """``bos/eos/pad_token_id`` for ``config.json``: the tokenizer's, None where it has none
    (and all None without a tokenizer: a guessed id would be silently wrong)."""
    found = tokenizer.special_tokens() if tokenizer is not None else {}
    return {f"{name}_token_id": (found.get(name) or (None, None))[1] for name in ("bos", "eos", "pad")}


def hf_config(args: ModelArgs, tokenizer: Optional[Tokenizer] = None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.d_model,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": args.tie_embeddings,
        "initializer_range": args.init_std,
        **special_token_ids(tokenizer),
        "torch_dtype": "float32",
    }


def tokenizer_config(tokenizer: Tokenizer, args: ModelArgs) -> dict:
    """``tokenizer_config.json``: the special tokens, so that ``AutoTokenizer`` knows the end token
    (a bare ``tokenizer.json`` does not say), and no BOS added: documents were trained without one."""
    config: dict = {"add_bos_token": False, "add_eos_token": False, "model_max_length": args.max_seq_len}
    for name, token in tokenizer.special_tokens().items():
        if token is not None:
            config[f"{name}_token"] = token[0]
    return config


def export_hf(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write the Hugging Face directory; returns it."""
    from safetensors.torch import save_file

    model, state = load_model(checkpoint)
    tokenizer_file: Optional[Path] = None
    tokenizer: Optional[Tokenizer] = None
    try:  # checked before anything is written: a wrong tokenizer refuses the export
        tokenizer_file, eos_token = run_tokenizer(checkpoint, state)
        tokenizer = load_tokenizer(tokenizer_file, eos_token=eos_token)
    except FileNotFoundError as exc:  # the weights are still worth exporting without one
        warnings.warn(f"{exc}; exporting the model without a tokenizer (config.json names no special tokens)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.args.tie_embeddings:
            continue
        tensors[hf_name(name)] = tensor.detach().to(torch.float32).contiguous()
    written = ["model.safetensors", "config.json"]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(model.args, tokenizer), indent=2))
    if tokenizer_file is not None and tokenizer is not None:
        name = "tokenizer.json" if tokenizer.kind == "huggingface" else "tokenizer.model"
        shutil.copyfile(tokenizer_file, out / name)
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tokenizer, model.args), indent=2))
        written += [name, "tokenizer_config.json"]
    for stale in set(OWNED_FILES) - set(written):  # left by an earlier export into this directory
        (out / stale).unlink(missing_ok=True)
    return out
