"""The gradient noise scale: the estimators, and B_simple measured under DDP on a problem
whose true gradient noise is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from multiprocess import run_ranks

from gradscope.distributed.noise_scale import NoiseScale, estimate

finite = st.floats(min_value=1e-3, max_value=1e3)


@given(grad_sq=finite, trace=finite, small=st.integers(1, 512), factor=st.integers(2, 64))
def test_estimators_invert_the_expected_norms(grad_sq, trace, small, factor):
    """With E|G_B|^2 = |G|^2 + tr(Sigma)/B plugged in exactly, the estimators return |G|^2 and tr(Sigma)."""
    big = small * factor
    got_grad_sq, got_trace = estimate(grad_sq + trace / small, grad_sq + trace / big, small, big)
    assert math.isclose(got_grad_sq, grad_sq, rel_tol=1e-9, abs_tol=1e-9 * trace)
    assert math.isclose(got_trace, trace, rel_tol=1e-9, abs_tol=1e-9 * grad_sq * big)


def test_noise_scale_is_the_ratio_of_the_moving_averages():
    noise = NoiseScale(world=4, batch_size=8, decay=0.5)
    assert math.isnan(noise.value)
    # |G|^2 = 2, tr(Sigma) = 64: per-rank batch 8 -> |G_b|^2 = 10; all 32 -> |G_B|^2 = 4.
    assert math.isclose(noise.update(10.0, 4.0), 32.0)
    assert math.isclose(noise.update(float("nan"), 4.0), 32.0)  # a non-finite step is skipped
    with pytest.raises(ValueError, match="at least 2 ranks"):
        NoiseScale(world=1)
    with pytest.raises(ValueError, match="need 0 < small_batch < big_batch"):
        estimate(1.0, 1.0, 4, 4)


def test_ddp_noise_scale_on_a_problem_with_known_noise(tmp_path):
    """loss = mean_i(w . z_i), z_i ~ N(m, s^2 I) in d dimensions: per-example gradients z_i,
    so |G|^2 = d m^2 = 4 and tr(Sigma) = d s^2 = 64: B_simple = 16 examples. Four ranks of
    8 examples each measure |G_8|^2 (expected 4 + 64/8 = 12) and |G_32|^2 (4 + 64/32 = 6)."""
    dim, sigma, mean, per_rank, steps = 64, 1.0, 0.25, 8, 300
    results = run_ranks(_jobs().noise_scale_job, 4, tmp_path, dim, sigma, mean, per_rank, steps)
    first = results[0]
    for other in results[1:]:
        np.testing.assert_array_equal(other["noise"], first["noise"])  # every rank, the same estimate
    small, big, noise = first["small"], first["big"], first["noise"]
    assert len(noise) == steps and np.isfinite(noise).all()
    # Each rank's own gradient before the all-reduce, and the averaged one after it.
    assert abs(small.mean() - 12.0) < 0.05 * 12.0
    assert abs(big.mean() - 6.0) < 0.05 * 6.0
    # The unbiased estimators over the whole run, and the moving average at its end.
    grad_sq, trace = estimate(small.mean(), big.mean(), per_rank, 4 * per_rank)
    assert abs(trace / grad_sq - 16.0) < 0.1 * 16.0
    assert abs(np.median(noise[100:]) - 16.0) < 0.25 * 16.0
    assert first["report"]["resources"]["noise_scale"] == noise[-1]


def _jobs():
    import distributed_jobs

    return distributed_jobs
