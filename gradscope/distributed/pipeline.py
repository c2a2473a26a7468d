"""Pipeline-parallel stages (``torch.distributed.pipelining``): which stage a monitor watches,
whether its rows can stand beside the other stages' as one model, and which ranks log.

``watch(stage)`` takes a ``PipelineStage``. A schedule (``ScheduleGPipe``, ``Schedule1F1B``)
runs one backward pass per microbatch on each stage, accumulating into ``.grad``, and makes the
gradient final only after the last of them, outside autograd: it divides by the number of
microbatches (``scale_grads=True``, the default), and a data-parallel stage module is reduced
on the last pass (DDP) or after it (FSDP's ``post_backward``, called by the schedule). No
backward hook sees that gradient; it exists when ``schedule.step()`` returns. So a stage is
measured in ``mode="step"``, from ``.grad`` at ``mon.step()``, once per optimisation step: the
statistics of the gradient the optimizer uses.

Each stage holds only its layers: its monitor reports its own rows, and one rank per stage
writes them (:attr:`PipelinePlace.log_folder`); :mod:`gradscope.run.stages` reads the stages'
logs back as one run of the whole model. For that no two stages may have a row of the same
name: ``pipeline()``'s stage modules and torchtitan-style ones keep the unsplit model's names,
but a stage built as ``nn.Sequential(*blocks[4:])`` calls its first block ``"0"`` as the first
stage does. :func:`place` checks this once, at ``watch()``, with one collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


def is_stage(obj) -> bool:
    """Whether ``obj`` is a ``torch.distributed.pipelining`` stage (``PipelineStage``, or one
    ``pipeline()``'s ``build_stage`` made)."""
    try:
        from torch.distributed.pipelining.stage import _PipelineStageBase
    except ImportError:  # pragma: no cover - torch builds without distributed
        return False
    return isinstance(obj, _PipelineStageBase)


@dataclass(frozen=True)
class PipelinePlace:
    """Where a watched stage stands in its pipeline.

    Attributes:
        stage: the stage's index (0: the stage that takes the model's input).
        stages: how many stages the pipeline has.
        ranks: the global rank holding each stage of this rank's pipeline, in stage order.
        logs: whether this rank writes the run log (and feeds the exporters, and warns).
        every_rank_logs: ``log_rank=None``: every rank writes its own log.
    """

    stage: int
    stages: int
    ranks: tuple[int, ...]
    logs: bool
    every_rank_logs: bool = False

    @property
    def log_folder(self) -> str:
        """The folder of ``log_dir`` this rank's log goes in: ``stage-NNNNN`` (the stage's), or
        ``rank-NNNNN`` (this rank's, when every rank logs)."""
        if self.every_rank_logs:
            return f"rank-{self.ranks[self.stage]:05d}"
        return f"stage-{self.stage:05d}"

    def to_dict(self) -> dict:
        """What the run log's header keeps (``RunInfo.extra["pipeline"]``), for the reader
        that joins the stages."""
        return {"stage": self.stage, "stages": self.stages, "ranks": list(self.ranks)}


def _pipeline_ranks(stage) -> tuple[int, ...]:
    """The global rank of each stage of ``stage``'s pipeline (stage ``s`` runs on the
    pipeline group's rank ``s``: one stage per rank)."""
    if stage.group is None:
        return tuple(range(stage.num_stages))
    return tuple(dist.get_global_rank(stage.group, s) for s in range(stage.num_stages))


def _check(everyone: list[tuple[int, int, tuple[int, ...], tuple[str, ...]]]) -> None:
    """Raise unless every rank holds one stage of pipelines of one length, the ranks holding a
    stage have its rows alike, and no row name belongs to two stages."""
    counts = {stages for _, stages, _, _ in everyone}
    if len(counts) > 1:
        raise ValueError(f"watch: the ranks' pipeline stages disagree on the number of stages: {sorted(counts)}")
    rows_of: dict[int, tuple[str, ...]] = {}
    for rank, (index, _, _, rows) in enumerate(everyone):
        if rows_of.setdefault(index, rows) != rows:
            raise ValueError(f"watch: rank {rank} holds pipeline stage {index} with other rows than another rank")
    stage_of: dict[str, int] = {}
    for index in sorted(rows_of):
        clash = [row for row in rows_of[index] if stage_of.setdefault(row, index) != index]
        if clash:
            shown = ", ".join(f"'{row}'" for row in clash[:5]) + (" ..." if len(clash) > 5 else "")
            raise ValueError(
                f"watch: pipeline stages {stage_of[clash[0]]} and {index} both have rows named {shown}: the stage "
                "modules do not keep the unsplit model's names, and the stages' rows could not be told apart. "
                "Name them as in the model: watch(stage, names=model) (the unsplit model, whose parameters the "
                "stage holds), or names={stage parameter name: model name} or a function of the name"
            )


def place(stage, rows: tuple[str, ...], log_rank: int | None) -> PipelinePlace:
    """Where ``stage`` stands, checked against every rank's stage (one ``all_gather_object``
    over the default group: every rank must call ``watch()`` alike).

    Args:
        stage: this rank's ``PipelineStage``.
        rows: the names of the rows its monitor reports.
        log_rank: ``watch(log_rank=)``: the ranks of the pipeline that holds this global rank
            write the log, one per stage; None: every rank writes its own.

    Raises:
        ValueError: several stages on one rank (interleaved, looped or V-shaped schedules),
            ranks that disagree on the pipeline, or a row name that two stages have (the
            message names the fix: ``watch(stage, names=...)``).
    """
    if stage.group_size != stage.num_stages:
        raise ValueError(
            f"watch: {stage.num_stages} pipeline stages on {stage.group_size} ranks: several stages per rank "
            "(interleaved, looped or V-shaped schedules) are not supported yet"
        )
    ranks = _pipeline_ranks(stage)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (stage.stage_index, stage.num_stages, ranks, tuple(rows)))
    _check(everyone)
    if log_rank is None:
        logs = True
    else:
        logs = dist.get_rank() in everyone[log_rank][2]
    return PipelinePlace(stage.stage_index, stage.num_stages, ranks, logs, every_rank_logs=log_rank is None)
