"""``RankRows``: statistics rows each rank measured on its own data, combined over a real
two-rank gloo group — rows as one tensor's, the earliest position and lowest rank of a
NaN/Inf, and a rank that failed voiding the step on every rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from multiprocess import run_ranks
from stats_reference import reference_row

from gradscope.stats import layout
from gradscope.stats.host_backend import host_rows

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

WORLD = 2
ROWS = 4


def tensors_of(seed: int, nonfinite: dict[int, float]) -> list[torch.Tensor]:
    """``ROWS`` tensors of different sizes and scales; ``nonfinite``: row -> NaN/Inf put into it."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(ROWS):
        t = torch.randn(5 + 3 * r + seed, generator=g) * 10.0 ** (r - 2 + seed)
        t[:2] = 0.0
        if r in nonfinite:
            t[3] = nonfinite[r]
        out.append(t)
    return out


def scenario(nonfinite=({}, {}), positions=({}, {}), failed=(), seed=0):
    """One step: per rank its tensors (with ``nonfinite[rank]``) and first-bad positions."""
    tensors = [tensors_of(seed + rank, nonfinite[rank]) for rank in range(WORLD)]
    rows = np.stack([host_rows(ts) for ts in tensors])
    first_bad = np.full((WORLD, ROWS), -1.0)
    for rank in range(WORLD):
        for r, position in positions[rank].items():
            first_bad[rank, r] = position
    return tensors, rows, first_bad, tuple(failed)


NAN, INF = float("nan"), float("-inf")
STEPS = [
    scenario(seed=0),
    scenario(
        # row 0: NaN on rank 1 only; row 1: on both, rank 1's earlier; row 2: Inf on rank 0 at position 0
        nonfinite=({1: NAN, 2: INF}, {0: NAN, 1: NAN}),
        positions=({1: 9, 2: 0}, {0: 123_456_789, 1: 4}),
        seed=2,
    ),
    scenario(nonfinite=({}, {3: INF}), positions=({}, {3: 2**39}), seed=4),
    scenario(failed=(1,), nonfinite=({0: NAN}, {}), positions=({0: 1}, {}), seed=6),
    scenario(failed=(0,), seed=8),
    scenario(failed=(0, 1), seed=10),
    scenario(seed=12),  # after the failures: combined again
]
EXPECTED_FIRST_BAD = [[-1] * 4, [123_456_789, 4, 0, -1], [-1, -1, -1, 2**39], None, None, None, [-1] * 4]
EXPECTED_RANK = [[-1] * 4, [1, 0, 0, -1], [-1, -1, -1, 1], None, None, None, [-1] * 4]


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    import distributed_jobs

    steps = [(rows, first_bad, failed) for _, rows, first_bad, failed in STEPS]
    return run_ranks(distributed_jobs.rank_rows_job, WORLD, tmp_path_factory.mktemp("rank_rows"), steps)


def test_every_rank_decodes_the_same(decoded):
    for ours, theirs in zip(decoded[0], decoded[1], strict=True):
        if ours is None or theirs is None:
            assert ours is theirs
        else:
            for a, b in zip(ours, theirs, strict=True):
                assert a.tobytes() == b.tobytes() and a.dtype == b.dtype


def test_rows_combine_as_one_tensor(decoded):
    for step, (tensors, rows, _, failed) in enumerate(STEPS):
        if failed:
            continue
        combined = decoded[0][step][0]
        assert combined.shape == (ROWS, layout.ROW_WIDTH) and combined.dtype == np.float64
        np.testing.assert_array_equal(combined, layout.combine_rows(rows))  # the declared rule
        for r in range(ROWS):
            ref = reference_row(torch.cat([tensors[rank][r] for rank in range(WORLD)]))
            exact = [ref[name] for name in ("numel", "max_abs", "zeros", "nans", "infs")]
            columns = [layout.NUMEL, layout.MAX_ABS, layout.ZEROS, layout.NANS, layout.INFS]
            assert combined[r, columns].tolist() == exact, (step, r)
            np.testing.assert_array_equal(combined[r, layout.HIST :], ref["hist"])
            np.testing.assert_allclose(combined[r, [layout.SUM, layout.SUMSQ]], [ref["sum"], ref["sumsq"]], rtol=1e-12)


def test_first_bad_is_the_earliest_position_over_ranks(decoded):
    for step, expected in enumerate(EXPECTED_FIRST_BAD):
        if expected is not None:
            first_bad = decoded[0][step][1]
            assert first_bad.dtype == np.int64 and first_bad.tolist() == expected, step


def test_nonfinite_rank_is_the_lowest_rank_with_nan_or_inf(decoded):
    for step, expected in enumerate(EXPECTED_RANK):
        if expected is not None:
            rank = decoded[0][step][2]
            assert rank.dtype == np.int64 and rank.tolist() == expected, step
            # Independently: the lowest rank whose own row held NaN/Inf.
            rows = STEPS[step][1]
            bad = rows[:, :, layout.NANS] + rows[:, :, layout.INFS] > 0
            assert [int(np.argmax(bad[:, r])) if bad[:, r].any() else -1 for r in range(ROWS)] == expected


def test_a_failed_rank_voids_the_step_on_every_rank(decoded):
    for step, (*_, failed) in enumerate(STEPS):
        assert (decoded[0][step] is None) == bool(failed) == (decoded[1][step] is None), step
