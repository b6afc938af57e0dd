"""Seed-noise estimate, t-intervals and the run objective (megareweight.mixing.stats / objective)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from megareweight.mixing import MixingError, blocked_noise_sd, run_objective, t_interval


def test_blocked_noise_ignores_setting_and_seed_effects():
    settings = np.array([1.0, 0.9, 1.2, 0.95])[:, None]
    seeds = np.array([0.0, 0.05, -0.02])[None, :]
    assert blocked_noise_sd(settings + seeds).sd == pytest.approx(0.0, abs=1e-12)   # purely additive: no noise


def test_blocked_noise_matches_two_way_anova_residual():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(7, 2)) * 0.01 + np.arange(7)[:, None] * 0.1 + np.array([0.0, 0.3])
    noise = blocked_noise_sd(y)
    # with 2 replicas the residual is half the within-setting difference minus its mean
    d = y[:, 0] - y[:, 1]
    assert noise.dof == 6
    assert noise.sd ** 2 == pytest.approx(np.sum((d - d.mean()) ** 2) / 2 / 6)
    big = rng.normal(size=(40, 30)) * 0.5                                  # recovers a known sd
    assert blocked_noise_sd(big).sd == pytest.approx(0.5, rel=0.05)


@pytest.mark.parametrize("table, match", [([[1.0, 2.0]], ">= 2 settings"), ([[1.0], [2.0]], ">= 2 replicas"),
                                          ([1.0, 2.0], "2-D"), ([[1.0, np.nan], [1.0, 2.0]], "non-finite")])
def test_blocked_noise_bad_inputs(table, match):
    with pytest.raises(MixingError, match=match):
        blocked_noise_sd(table)


def test_t_interval_matches_scipy():
    values = [0.1, -0.05, 0.2]
    iv = t_interval(values)
    lo, hi = stats.t.interval(0.95, 2, loc=np.mean(values), scale=stats.sem(values))
    assert (iv.low, iv.high, iv.n) == (pytest.approx(lo), pytest.approx(hi), 3)
    assert not iv.excludes_zero and t_interval([1.0, 1.1, 0.9]).excludes_zero
    with pytest.raises(MixingError, match="at least 2"):
        t_interval([1.0])


def test_run_objective_ppl_and_loss():
    assert run_objective([1.0, 2.0], "ppl") == pytest.approx((math.e + math.e ** 2) / 2)
    assert run_objective([1.0, 2.0], "loss") == pytest.approx(1.5)
    with pytest.raises(MixingError, match="allowed values: ppl, loss"):
        run_objective([1.0], "bpc")
    with pytest.raises(MixingError, match="finite"):
        run_objective([1.0, float("nan")])
