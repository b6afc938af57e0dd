"""LLaMA-style model: named sizes, meta-device construction, causality, tied weights."""
from __future__ import annotations

import pytest
import torch

from megareweight.model import MODEL_SIZES, build_model, count_parameters, model_args


def test_paper_and_llama2_sizes_on_meta_device():
    big = build_model(model_args("1.4b", vocab_size=32000), "meta")
    assert all(p.is_meta for p in big.parameters())
    a = big.args
    assert (a.d_model, a.n_layers, a.n_heads) == (2048, 24, 16)
    # LLaMA-2 7B has 6,738,415,616 parameters with a 32000 vocabulary and untied embeddings.
    assert count_parameters(build_model(model_args("7b", vocab_size=32000), "meta")) == 6_738_415_616


def test_parameter_count_formula():
    args = model_args("tiny", vocab_size=100)
    d, f, L = args.d_model, args.hidden_dim, args.n_layers
    expected = 100 * d + L * (4 * d * d + 3 * d * f + 2 * d) + d  # tied head
    assert count_parameters(build_model(args)) == expected


def test_forward_shapes_and_tied_head():
    model = build_model(model_args("tiny", vocab_size=50))
    ids = torch.randint(0, 50, (2, 7))
    assert model(ids).shape == (2, 7, 64)
    assert model.logits(ids).shape == (2, 7, 50)
    assert model.output_weight is model.embed.weight
    untied = build_model(model_args("tiny", vocab_size=50, tie_embeddings=False))
    assert untied.output_weight is untied.lm_head.weight


def test_causal():
    torch.manual_seed(0)
    model = build_model(model_args("tiny", vocab_size=50)).eval()
    ids = torch.randint(0, 50, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 50
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    plain = build_model(model_args("tiny", vocab_size=50))
    ckpt = build_model(model_args("tiny", vocab_size=50), activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 50, (2, 9))
    for m in (plain, ckpt):
        m(ids).pow(2).mean().backward()
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="model.size: unknown 'xl'; allowed: tiny, small, 125m, 1.4b, 7b"):
        model_args("xl")
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        build_model(model_args("tiny", vocab_size=10, max_seq_len=4))(torch.zeros(1, 5, dtype=torch.long))
    assert set(MODEL_SIZES) == {"tiny", "small", "125m", "1.4b", "7b"}
