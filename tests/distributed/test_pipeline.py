"""Pipeline parallel (``torch.distributed.pipelining``) under real multi-process gloo groups.

``watch(stage)`` on each of two stages, trained by ``ScheduleGPipe`` (2 microbatches, stages
cut by hand, ``names=model``), ``Schedule1F1B`` (4 microbatches, stages cut by ``pipeline()``,
every rank logging) or ``Schedule1F1B`` on 4 ranks (2 stages x 2 FSDP2 shards), is compared
with the same model trained unsplit in one process, in float64: each stage's rows, their
names, and the run that ``load_run(log_dir)`` reads back from the stages' logs (every row,
the whole model's total norm, loss and report).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from multiprocess import run_ranks

import gradscope
from gradscope.distributed import pipeline
from gradscope.monitor.watched import select

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

RTOL = 1e-5

SCENARIOS = {
    # schedule, how the stages are cut, microbatches, log_rank; world = 2 stages x replicas
    "gpipe": (("gpipe", "by_hand", 2, 0), 2),
    "1f1b": (("1f1b", "pipeline", 4, None), 2),
    "1f1b-fsdp": (("1f1b", "by_hand", 2, 0), 4),
}


def _jobs():
    import pipeline_jobs

    return pipeline_jobs


@pytest.fixture(scope="module", params=list(SCENARIOS))
def trained(request, tmp_path_factory):
    """One pipeline run per scenario (a spawn costs seconds): every rank's results, the log
    directory, the reference (unsplit model) gradients and losses, and the scenario."""
    args, world = SCENARIOS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    results = run_ranks(_jobs().pipeline_job, world, root, *args)
    grads, losses, row_of = _jobs().reference_run(replicas=world // 2)
    run = {"name": request.param, "split": args[1], "results": results, "log": root / "log", "world": world}
    return run, (grads, losses, row_of)


def _reference_rows(grads: dict[str, torch.Tensor], row_of: dict[str, str]) -> dict[str, dict]:
    """Per row (module): norm, max |g| and exact zeros of its parameters' gradients together."""
    rows: dict[str, list[torch.Tensor]] = {}
    for name, grad in grads.items():
        rows.setdefault(row_of[name], []).append(grad.flatten())
    out = {}
    for row, parts in rows.items():
        flat = torch.cat(parts)
        out[row] = {
            "norm": float(flat.norm()),
            "max_abs": float(flat.abs().max()),
            "zeros": int((flat == 0).sum()),
            "numel": flat.numel(),
        }
    return out


def _assert_rows(series: dict, expected: list[dict[str, dict]], where: str) -> None:
    """Every sampled step of ``series`` (``history(field)`` by field) equals ``expected[step]``:
    norm and max within RTOL relative, zeros and element counts exactly."""
    rows = series["norm"].rows
    assert series["norm"].steps.tolist() == list(range(len(expected))), where
    for position, step in enumerate(series["norm"].steps.tolist()):
        for r, row in enumerate(rows):
            ref = expected[step][row]
            at = f"{where}: step {step}, row {row}"
            assert series["present"].values[position, r], at
            for field in ("norm", "max_abs"):
                value = series[field].values[position, r]
                assert abs(value - ref[field]) <= RTOL * ref[field], f"{at}: {field} {value} != {ref[field]}"
            assert series["zeros"].values[position, r] == ref["zeros"], f"{at}: zeros"
            assert series["numel"].values[position, r] == ref["numel"], f"{at}: numel"


def _model_rows() -> tuple[str, ...]:
    """The unsplit model's rows, in model order (what a single-process watch() reports)."""
    return select(_jobs().model()).row_names


def test_each_stage_measures_the_accumulated_gradient_after_the_schedule(trained):
    """Per stage, every row at every step equals the unsplit model's gradient (the schedule's
    microbatches accumulated and scaled), chosen without mode= (a stage is measured at
    mon.step()); the rows carry the unsplit model's names, the first stage's first."""
    run, (grads, _, row_of) = trained
    expected = [_reference_rows(g, row_of) for g in grads]
    model_rows = _model_rows()
    seen: list[str] = []
    for rank, result in enumerate(run["results"]):
        assert set(result["rows"]) <= set(model_rows), result["rows"]
        _assert_rows(result["series"], expected, f"{run['name']} rank {rank}")
        assert result["mode"] == "step" and result["errors"] == []
        assert result["topology"] == ("sharded" if run["world"] == 4 else "single")
        assert result["report_layers"] == list(result["rows"])
        if rank < 2:
            seen.extend(result["rows"])
    assert tuple(seen) == model_rows  # stage 0's rows then stage 1's: the whole model, once


def test_stages_whose_names_collide_are_refused_naming_the_fix(trained):
    """Stages cut by hand (nn.Sequential renumbers the blocks) have rows of the same name:
    watch(stage) refuses on every rank and names the fix, watch(stage, names=model)."""
    run, _ = trained
    if run["split"] != "by_hand":
        assert all("collision" not in result for result in run["results"])
        return
    for result in run["results"]:
        message = result["collision"]
        assert "pipeline stages 0 and 1 both have rows named '1.fc'" in message
        assert "names=model" in message


def test_the_stages_logs_load_as_one_run_of_the_whole_model(trained):
    """load_run(log_dir) of the stages' logs: one run, every stage's rows in stage order, each
    equal to the unsplit model's at every step, the whole model's total norm (the square root
    of the stages' summed squares), the last stage's loss, and a report of every layer."""
    run, (grads, losses, row_of) = trained
    logged = gradscope.load_run(run["log"])
    assert logged.rows == _model_rows()
    assert logged.closed
    expected = [_reference_rows(g, row_of) for g in grads]
    _assert_rows({field: logged.history(field) for field in _jobs().FIELDS}, expected, f"{run['name']} log")
    for step, step_grads in enumerate(grads):
        total = math.sqrt(sum(float((g * g).sum()) for g in step_grads.values()))
        assert abs(logged.stats(step).total_norm - total) <= RTOL * total
    if run["world"] == 2:  # one pipeline: its loss is the unsplit model's on the same batch
        np.testing.assert_allclose(logged.history("loss").values, losses, rtol=RTOL)
    report = logged.report()
    assert [layer["name"] for layer in report.to_dict()["layers"]] == list(_model_rows())
    assert report.status == "healthy"
    assert logged.info.extra["pipeline"]["stage_rows"] == [len(r["rows"]) for r in run["results"][:2]]


def test_every_stage_logs_and_none_is_dropped(trained):
    """Each stage's log is written (one rank per stage: the pipeline holding log_rank, or every
    rank with log_rank=None), in a folder named by stage (or by rank)."""
    run, _ = trained
    folders = sorted(p.name for p in run["log"].iterdir())
    logging = [rank for rank, result in enumerate(run["results"]) if result["logs"]]
    if run["name"] == "1f1b":  # log_rank=None: every rank
        assert folders == ["rank-00000", "rank-00001"] and logging == [0, 1]
    else:
        assert folders == ["stage-00000", "stage-00001"] and logging == [0, 1]
    for rank, result in enumerate(run["results"]):
        assert result["place"] == {"stage": rank % 2, "stages": 2, "ranks": [rank - rank % 2, rank - rank % 2 + 1]}
    for folder in folders:  # each stage's log alone is a run of that stage's rows
        stage = int(gradscope.load_run(run["log"] / folder).info.extra["pipeline"]["stage"])
        assert gradscope.load_run(run["log"] / folder).rows == tuple(run["results"][stage]["rows"])


def test_mode_backward_and_accumulation_steps_are_refused_for_a_stage(trained):
    """A stage's gradients are final only after schedule.step(): mode='backward' (by keyword or
    in its positional place) and accumulation_steps are refused, saying why."""
    run, _ = trained
    for result in run["results"]:
        backward, positional, accumulation = result["refused"]
        assert backward == positional and "measured in mode='step'" in backward
        assert "accumulation_steps does not apply to a pipeline stage" in accumulation


def test_row_names_two_stages_share_are_refused_naming_the_fix():
    """The check behind watch(stage), on every rank's (stage, stages, ranks, rows)."""
    one = [(0, 2, (0, 1), ("0", "1.fc")), (1, 2, (0, 1), ("0", "1.fc", "2"))]
    with pytest.raises(ValueError, match=r"stages 0 and 1 both have rows named '0', '1.fc': .*names=model"):
        pipeline._check(one)
    pipeline._check([(0, 2, (0, 1), ("emb",)), (1, 2, (0, 1), ("head",)), (0, 2, (2, 3), ("emb",))])
    with pytest.raises(ValueError, match="disagree on the number of stages"):
        pipeline._check([(0, 2, (0, 1), ("a",)), (1, 3, (0, 1, 2), ("b",))])
    with pytest.raises(ValueError, match="rank 2 holds pipeline stage 0 with other rows"):
        pipeline._check([(0, 2, (0, 1), ("a",)), (1, 2, (0, 1), ("b",)), (0, 2, (2, 3), ("c",))])


def test_several_stages_per_rank_are_refused_before_any_collective():
    looped = SimpleNamespace(group_size=2, num_stages=4)
    with pytest.raises(ValueError, match="4 pipeline stages on 2 ranks: several stages per rank"):
        pipeline.place(looped, ("a",), 0)


def test_is_stage_recognises_only_pipeline_stages():
    assert not pipeline.is_stage(torch.nn.Linear(2, 2))
    assert not pipeline.is_stage(object())
