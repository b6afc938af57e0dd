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


# Forward calls per block (attention, feed-forward) in one forward + backward of the 4-layer model.
RECOMPUTED = {
    "none": [(1, 1)] * 4,
    "full": [(2, 2)] * 4,
    True: [(2, 2)] * 4,
    "every_k": [(2, 2), (1, 1), (2, 2), (1, 1)],  # k = 2: blocks 0 and 2
    "attention": [(2, 1)] * 4,
    "ffn": [(1, 2)] * 4,
}


@pytest.mark.parametrize("mode", list(RECOMPUTED))
def test_activation_checkpointing_recomputes_what_the_mode_says_with_same_gradients(mode):
    args = model_args("tiny", vocab_size=50, n_layers=4)
    torch.manual_seed(0)
    plain = build_model(args)
    ckpt = build_model(args, activation_checkpointing=mode, checkpoint_every=2)
    ckpt.load_state_dict(plain.state_dict())
    calls = {}
    for i, block in enumerate(ckpt.layers):
        for j, sub in enumerate((block.attn, block.ffn)):
            sub.register_forward_pre_hook(lambda *_, key=(i, j): calls.__setitem__(key, calls.get(key, 0) + 1))
    ids = torch.randint(0, 50, (2, 9))
    for m in (plain, ckpt):
        m(ids).pow(2).mean().backward()
    assert [(calls[i, 0], calls[i, 1]) for i in range(4)] == RECOMPUTED[mode]
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)
    ckpt.eval()
    calls.clear()
    with torch.no_grad():
        ckpt(ids)
    assert all(v == 1 for v in calls.values())  # evaluation never recomputes


def test_bad_checkpointing_values():
    with pytest.raises(ValueError, match="model.activation_checkpointing: 'sometimes' is not allowed"):
        build_model(model_args("tiny", vocab_size=50), activation_checkpointing="sometimes")
    with pytest.raises(ValueError, match="model.checkpoint_every must be >= 1"):
        build_model(model_args("tiny", vocab_size=50), activation_checkpointing="every_k", checkpoint_every=0)


def test_lm_head_owns_the_untied_matrix_and_borrows_the_tied_one():
    """The LM head is a module (ZeRO-3 gathers what a module owns); state-dict keys are unchanged."""
    untied = build_model(model_args("tiny", vocab_size=50, tie_embeddings=False))
    assert [n for n, _ in untied.lm_head.named_parameters()] == ["weight"]
    assert "lm_head.weight" in untied.state_dict()
    tied = build_model(model_args("tiny", vocab_size=50))
    assert list(tied.lm_head.parameters()) == [] and "lm_head.weight" not in tied.state_dict()
    assert tied.output_weight is tied.embed.weight
    seen = []
    out = tied.lm_head(torch.ones(1, 2, 64), torch.zeros(1, 2, dtype=torch.long),
                       loss_fn=lambda h, w, y, **kw: seen.append((w, kw)) or "loss", r=0.5)
    assert out == "loss" and seen[0][0] is tied.embed.weight and seen[0][1] == {"r": 0.5}


def test_errors():
    with pytest.raises(ValueError, match="model.size: unknown 'xl'; allowed: tiny, small, 125m, 1.4b, 7b"):
        model_args("xl")
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        build_model(model_args("tiny", vocab_size=10, max_seq_len=4))(torch.zeros(1, 5, dtype=torch.long))
    assert set(MODEL_SIZES) == {"tiny", "small", "125m", "1.4b", "7b"}
