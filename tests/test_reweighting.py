"""Reweighting formulas (Sow et al., ICLR 2025) on hand-computed cases and properties."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megareweight.reweighting.strategies import PRIOR_STRATEGIES
from megareweight.reweighting import (
    STRATEGIES,
    ReweightSchedule,
    compute_weights,
    normalize_losses,
    weight_statistics,
    weighted_loss,
)

losses_strategy = st.lists(st.floats(0.01, 20.0, allow_nan=False), min_size=2, max_size=64)


#: strategies whose weights are a function of the losses alone (``domain`` needs a prior)
LOSS_STRATEGIES = sorted(set(STRATEGIES) - set(PRIOR_STRATEGIES))


def test_normalize_hand_computed():
    x = normalize_losses(torch.tensor([1.0, 2.0, 3.0, 5.0]))
    # mid = 3, range = 4: x = 2*(l - 3)/4
    assert torch.allclose(x, torch.tensor([-1.0, -0.5, 0.0, 1.0]))
    x = normalize_losses(torch.tensor([1.0, 3.0]), delta=2.0)
    assert torch.allclose(x, torch.tensor([-2.0, 2.0]))


def test_normalize_constant_losses_uses_epsilon():
    x = normalize_losses(torch.tensor([2.0, 2.0, 2.0]))
    assert torch.equal(x, torch.zeros(3))


def test_strategies_hand_computed():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    assert torch.allclose(STRATEGIES["linupper"](x, 1.0), torch.tensor([0.0, 0.5, 1.0, 1.0, 1.0]))
    assert torch.allclose(STRATEGIES["quadratic"](x, 1.0), torch.tensor([0.0, 0.75, 1.0, 0.75, 0.0]))
    assert torch.allclose(STRATEGIES["extremes"](x, 1.0), torch.tensor([1.0, 0.5, 0.0, 0.5, 1.0]))
    assert torch.allclose(STRATEGIES["linear"](x, 1.0), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    assert torch.equal(STRATEGIES["uniform"](x, 1.0), torch.zeros(5))


def test_linupper_weights_hand_computed():
    # losses 1, 3: x = -1, 1 -> f = 0, 1 -> softmax([0, 1] / 0.5) = [1, e^2] / (1 + e^2)
    w = compute_weights(torch.tensor([1.0, 3.0]), "linupper", r=0.5)
    e2 = math.exp(2.0)
    assert torch.allclose(w, torch.tensor([1 / (1 + e2), e2 / (1 + e2)]))


def test_quadratic_weights_hand_computed():
    # losses 0, 1, 2: x = -1, 0, 1 -> f = 0, 1, 0; r = 1
    w = compute_weights(torch.tensor([0.0, 1.0, 2.0]), "quadratic", r=1.0)
    z = 2 + math.e
    assert torch.allclose(w, torch.tensor([1 / z, math.e / z, 1 / z]))


def test_max_weight_ratio_is_exp_one_over_r():
    w = compute_weights(torch.tensor([0.0, 10.0]), "linear", r=0.25)
    assert torch.isclose(w[1] / w[0], torch.tensor(math.exp(1 / 0.25)), rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(losses=losses_strategy, strategy=st.sampled_from(LOSS_STRATEGIES), r=st.floats(0.05, 50.0))
def test_weights_sum_to_one_and_are_positive(losses, strategy, r):
    w = compute_weights(torch.tensor(losses), strategy, r)
    assert torch.isclose(w.sum(), torch.tensor(1.0), atol=1e-5)
    assert bool((w > 0).all())


@settings(max_examples=40, deadline=None)
@given(losses=losses_strategy, strategy=st.sampled_from(LOSS_STRATEGIES))
def test_weights_become_uniform_as_r_grows(losses, strategy):
    w = compute_weights(torch.tensor(losses), strategy, r=1e6)
    assert torch.allclose(w, torch.full_like(w, 1 / len(losses)), atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(losses=losses_strategy, r=st.floats(0.05, 10.0))
def test_linupper_preserves_order(losses, r):
    t = torch.tensor(losses)
    w = compute_weights(t, "linupper", r)
    order = torch.argsort(t)
    assert bool((w[order][1:] >= w[order][:-1] - 1e-7).all()), "a higher loss never gets a lower weight"


def test_invalid_samples_get_zero_weight_and_do_not_shift_the_range():
    losses = torch.tensor([1.0, float("nan"), 3.0, float("inf"), 100.0])
    mask = torch.tensor([True, True, True, True, False])
    w = compute_weights(losses, "linupper", r=0.5, mask=mask)
    assert torch.equal(w[[1, 3, 4]], torch.zeros(3))
    assert torch.allclose(w[[0, 2]], compute_weights(torch.tensor([1.0, 3.0]), "linupper", r=0.5))
    assert torch.isfinite(w).all()


def test_all_invalid_gives_zero_weights_not_nan():
    w = compute_weights(torch.tensor([float("nan"), float("nan")]), "linupper", r=1.0)
    assert torch.equal(w, torch.zeros(2))


def test_weighted_loss_single_process_gradient():
    l = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    out = weighted_loss(l, "linupper", r=1.0)
    out.loss.backward()
    # d loss / d l_i = w_i (weights are constants)
    assert torch.allclose(l.grad, out.weights)
    assert torch.isclose(out.loss, (out.weights * l.detach()).sum())


def test_weighted_loss_masks_nonfinite_without_nan():
    l = torch.tensor([1.0, float("nan"), 3.0], requires_grad=True)
    out = weighted_loss(l, "quadratic", r=1.0)
    assert torch.isfinite(out.loss)
    assert out.valid.tolist() == [True, False, True]
    out.loss.backward()
    assert l.grad[1] == 0


def test_unknown_strategy_names_allowed_values():
    with pytest.raises(ValueError, match="allowed: domain, extremes, linear, linupper, quadratic, uniform"):
        compute_weights(torch.tensor([1.0, 2.0]), "linup", r=1.0)


def test_bad_temperature():
    with pytest.raises(ValueError, match="r must be > 0"):
        compute_weights(torch.tensor([1.0, 2.0]), "linupper", r=0.0)


def test_weight_statistics():
    w = torch.tensor([0.25, 0.25, 0.5, 0.0])
    stats = weight_statistics(w, w > 0, torch.tensor([0, 1, 1, 0]), 2)
    assert torch.isclose(stats["ess"], torch.tensor(1 / (0.0625 * 2 + 0.25)))
    assert stats["min"] == 0.25 and stats["max"] == 0.5
    assert torch.allclose(stats["share"], torch.tensor([0.25, 0.75]))
    uniform = torch.full((8,), 1 / 8)
    assert torch.isclose(weight_statistics(uniform, uniform > 0)["entropy"], torch.tensor(math.log(8)))


def test_schedule_warmup_modes():
    s = ReweightSchedule("linupper", r=0.4, warmup_steps=3)
    assert [s.at(i) for i in (0, 2, 3)] == [("uniform", 0.4), ("uniform", 0.4), ("linupper", 0.4)]
    t = ReweightSchedule("linupper", r=0.4, warmup_steps=2, warmup_mode="temperature", warmup_r=100.0)
    assert t.at(1) == ("linupper", 100.0) and t.at(2) == ("linupper", 0.4)
    with pytest.raises(ValueError, match="warmup_mode"):
        ReweightSchedule("linupper", warmup_mode="cosine")


def test_domain_weights_are_the_normalised_domain_constants():
    """strategy=domain: w_i = c_{d(i)} / sum_j c_{d(j)} over the valid samples, whatever the losses."""
    losses = torch.tensor([2.0, 9.0, 0.5, float("nan"), 4.0])
    c = torch.tensor([3.0, 1.0, 1.0, 3.0, 0.5])
    w = compute_weights(losses, "domain", r=0.4, log_prior=torch.log(c))
    assert torch.allclose(w, torch.tensor([3.0, 1.0, 1.0, 0.0, 0.5]) / 5.5)
    # the same constants with other losses: the same weights (not a function of the loss)
    assert torch.equal(w, compute_weights(losses.flip(0).flip(0) * 7, "domain", r=3.0, log_prior=torch.log(c)))


def test_domain_strategy_needs_its_prior():
    with pytest.raises(ValueError, match="needs per-sample log weights"):
        compute_weights(torch.ones(3), "domain", r=1.0)


def test_weighted_loss_applies_the_prior_to_the_gradient():
    losses = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    out = weighted_loss(losses, "domain", 1.0, log_prior=torch.log(torch.tensor([1.0, 2.0, 1.0])))
    out.loss.backward()
    assert torch.allclose(losses.grad, torch.tensor([0.25, 0.5, 0.25]))
