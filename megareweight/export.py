"""``megareweight export``: a checkpoint -> a Hugging Face LLaMA directory.

Writes ``model.safetensors`` + ``config.json`` (+ the SentencePiece model when the run's prepared
data is still there) that ``transformers.LlamaForCausalLM.from_pretrained`` loads. Our blocks
use the same rotary convention (rotate-half) and RMSNorm as Hugging Face's LLaMA, so the export is
a renaming of tensors, not a conversion.
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
from megareweight.model import ModelArgs

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


def hf_config(args: ModelArgs, eos_id: int = 1) -> dict:
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
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }


def export_hf(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write the Hugging Face directory; returns it."""
    from safetensors.torch import save_file

    model, state = load_model(checkpoint)
    try:  # checked before anything is written: a wrong tokenizer refuses the export
        tokenizer: Optional[Path] = run_tokenizer(checkpoint, state)[0]
    except FileNotFoundError as exc:  # the weights are still worth exporting without one
        warnings.warn(f"{exc}; exporting the model without a tokenizer")
        tokenizer = None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.args.tie_embeddings:
            continue
        tensors[hf_name(name)] = tensor.detach().to(torch.float32).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(model.args), indent=2))
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / tokenizer.name)  # tokenizer.model or a Hugging Face tokenizer.json
    return out
