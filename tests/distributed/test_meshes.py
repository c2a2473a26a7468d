"""One monitor for a model on a 2-D ``(dp, tp)`` device mesh (FSDP2 x tensor parallel), with
the norm and output layer on the ``dp`` submesh only: real gloo ranks, against the unsharded
model in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch.distributed as dist
from multiprocess import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")


def _jobs():
    import mesh_jobs

    return mesh_jobs


@pytest.mark.parametrize(("mode", "layout"), [("backward", "fsdp_tp"), ("step", "fsdp_tp"), ("backward", "hsdp")])
def test_fsdp2_with_tensor_parallel_on_a_2d_mesh_is_one_model(tmp_path, mode, layout):
    """``watch(model)`` takes parameters on the (dp, tp) mesh and on its dp submesh together
    (and HSDP's replicated-and-sharded placements):
    each row and ``stats().total_norm`` equal the unsharded model's (the job asserts it, every
    step, within 1e-5 relative of float64), every rank reports the same, nothing failed."""
    results = run_ranks(_jobs().fsdp_tp_job, 4, tmp_path, mode, layout)
    first = results[0]
    assert first["errors"] == [] and first["worst"] <= 1e-5
    assert first["topology"] == {"kind": "sharded", "world": 4, "rank": 0, "global_rank": 0}
    for rank, result in enumerate(results):
        assert result["topology"]["global_rank"] == rank
        np.testing.assert_array_equal(result["norm"], first["norm"])
        assert result["totals"] == first["totals"]
        assert result["report"]["findings"] == first["report"]["findings"]
        assert result["report"]["layers"] == first["report"]["layers"]
