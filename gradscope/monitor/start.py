"""``gradscope.watch``: start monitoring a model's gradients.

::

    mon = gradscope.watch(model)
    for batch in data:
        loss = model(batch).loss
        loss.backward()
        mon.step(loss=loss)          # end of one optimisation step; loss stays on the device
        opt.step(); opt.zero_grad()
    mon.history("norm")              # (steps, layers) NumPy array, steps and layer names

The options are listed once, as the fields of
:class:`~gradscope.monitor.options.WatchOptions`; ``watch``'s signature is built from them.
"""

from __future__ import annotations

import inspect

import torch

from gradscope.distributed import pipeline
from gradscope.monitor.monitor import Monitor
from gradscope.monitor.options import WatchOptions


def watch(model: torch.nn.Module, *args, **options) -> Monitor:
    """Start monitoring ``model``'s gradients; returns the :class:`~gradscope.monitor.monitor.Monitor`.

    Args:
        model: the model (a ``torch.compile`` wrapper is fine: its parameters are watched), or
            a pipeline stage (``torch.distributed.pipelining.PipelineStage``): its module is
            watched, in ``mode="step"``, once per ``schedule.step()``; see below.
        every: sample steps 0, every, 2*every, ...; on other steps the hooks return at once.
        mode: ``"backward"`` (measure each gradient as soon as it is final, overlapping
            backward) or ``"step"`` (measure all gradients at ``mon.step()``).
        accumulation_steps: backward passes per optimisation step; gradients are measured
            in the last one, when they are complete (backward mode). Or a function of no
            arguments that says, as a pass begins, whether it is the step's last: with
            Accelerate, ``lambda: accelerator.sync_gradients`` is right also when the last
            window of an epoch is shorter.
        optimizer: needed for ``track_updates``; also tells a ``scaler`` which optimizer's
            gradients may already be unscaled.
        scaler: a ``torch.amp.GradScaler``; statistics are then of the unscaled gradients
            (``g * inv_scale`` as the scaler computes it), and steps it skips for overflow
            show as ``skipped`` in the history.
        track_updates: record per-layer weight norm, update norm ``||w_after - w_before||``
            and their ratio on sampled steps (costs one copy of the watched parameters).
        history: sampled steps kept in memory (oldest dropped; see ``history_mib``).
        granularity: ``"layer"`` (rows are modules) or ``"parameter"`` (rows are parameters).
        params: which parameters: names or glob patterns, or a predicate ``(name, param)``.
        names: what to call the parameters (and so the rows): the model they belong to (each
            is named as there, found by identity; for a stage cut from a larger model), or a
            mapping or function from the watched module's parameter names to names. None:
            their names in ``model``.
        backend: ``"auto"``, ``"triton"``, ``"numba"`` or ``"numpy"`` (as in :func:`gradscope.grad_stats`).
        hist_history: sampled steps with histograms whose histograms are kept (the newest).
        history_mib: MiB the history may take (default 512), whatever the model's size: where
            ``history`` and ``hist_history`` do not fit, fewer steps are kept, the older
            sampled steps thinned to one in N so that ``history()`` still reaches back
            ``history`` sampled steps; the newest (at least half, and at least 64) stay
            every one. Warns once, with the numbers (:mod:`gradscope.run.budget`).
        histogram_every: compute the 64-bin histogram (and what is read from it: FP8
            readiness, underflow, the exporters' histograms) at one sampled step in this many
            (default 32): steps ``0, every * histogram_every, ...``. Other sampled steps get
            *light statistics*, every other column of the row at a fraction of the cost,
            and still a histogram for each gradient that holds NaN/Inf, a non-zero value
            below 2**-63 or one from 2**56 up (decided on the device, no host sync). Findings
            read each layer's newest histogram and say which step it is from. 1: a
            histogram at every sampled step.
        thresholds: the health checks' :class:`gradscope.Thresholds` for :meth:`Monitor.report`.
        log_dir: a new directory for the run log (JSON Lines, read back with
            :func:`gradscope.load_run`), written off the training thread.
        exporters: more destinations for the run's records, e.g.
            ``[gradscope.exporters.TensorBoardExporter("runs/tb")]``.
        log_rank: in a distributed run, the (global) rank that writes the run log, feeds
            the exporters and warns; the others stay silent (every rank still has the
            same history and report). None: every rank logs, into ``log_dir/rank-NNNNN``.
        check_consistency: DDP only: compare the ranks' averaged gradients at every
            sampled step (one small collective) and report ranks that disagree as a
            critical ``rank_desync`` finding.
        comm_hook: DDP only: register gradscope's communication hook (DDP's averaging plus
            one norm per bucket before and after it, on sampled steps) for the gradient
            noise scale and the rank a non-finite gradient came from. Skipped, with a
            warning, when the model already has a hook.
        batch_size: DDP: examples per rank per optimisation step, to express the noise
            scale in examples (None: in per-rank batches).
        noise_scale_decay: DDP: decay of the noise scale's moving averages, per sampled step.
        forward: also measure every module's outputs (and inputs no module produced) on
            sampled steps, with the same statistics and no host sync
            (:mod:`gradscope.monitor.forward`): the report can then name the module where
            a NaN/Inf was born in the forward pass, and judge activations' number formats.
            Costs one read of each activation on sampled steps (see README for the measured
            overhead); off by default.
        on_finding: a function called with each new :class:`~gradscope.Finding` (and again
            when one's severity rises), on the training thread, at ``mon.step()``. If it
            raises, the error goes to ``mon.errors`` (one warning) and training goes on,
            unless it raises :class:`gradscope.TrainingHalted` itself.
        halt_on: finding kinds and/or severities (``"nonfinite"``, ``("nonfinite",
            "divergence")``, ``"critical"``): ``mon.step()`` raises
            :class:`gradscope.TrainingHalted` (with the finding and the report) at the first
            step at which such a finding is seen. NaN/Inf and spikes are judged at the step
            their statistics reach the host: on CPU the step itself; on CUDA usually one step
            later, except that a rule matching NaN/Inf (``"nonfinite"`` or a severity) makes
            ``mon.step()`` wait for each sampled step's statistics (one host sync per sampled
            step), so it raises before the NaN step's ``optimizer.step()``. Slower findings (vanishing,
            plateau, divergence...) are judged within about a second of wall time (judging
            is kept under 1% of the run's time; :mod:`gradscope.actions.cadence`). In a
            distributed run the log rank decides and every rank acts one step later, together
            (:mod:`gradscope.actions.consensus`).
        early_stopping: a :class:`gradscope.EarlyStopping` (or True: ``val_loss``, patience
            5): ``mon.should_stop``, ``mon.stop_reason``, ``mon.best_step`` and ``mon.best_value``.
        adapt_lr: a :class:`gradscope.AdaptiveLR` (or True for its defaults): lower the
            ``optimizer``'s learning rate on exploding gradients, loss spikes, divergence and
            plateaus (:mod:`gradscope.actions.adaptive_lr`); needs ``optimizer=``.
        compression: read the watched weights with the same statistics engine just before
            ``optimizer.step()`` on sampled steps (the cadence of ``track_updates``), with
            each tensor's ``Σ g·w`` and ``Σ (g·w)²``: the report's ``compression`` section
            then says, per layer, whether its matrices are ready for INT8 / FP8 with
            per-tensor scaling, and ranks the layers by first-order Taylor saliency
            ``Σ_steps |Σ g·w|``, the least important first
            (:mod:`gradscope.health.compression`). Costs one read of the weights and one
            more of the gradients on sampled steps; needs ``optimizer=``.
        tags: labels of the run, kept in its log's header (``run.tags`` once loaded), to tell
            runs apart when comparing them (:func:`gradscope.compare`, ``by="fold"``): a dict of
            names to JSON scalars, e.g. ``{"fold": 2, "lr": 3e-4, "seed": 0}``.

    The first seven options (``every`` to ``history``) may also be given positionally, in
    this order, after the model. They are kept,
    validated, as :class:`~gradscope.monitor.options.WatchOptions` (``mon.options``).

    Distributed runs (see :mod:`gradscope.distributed`): with DDP the statistics are those of
    the averaged gradient, measured when DDP has finished averaging; with sharded (DTensor,
    FSDP2) parameters each rank measures its shard and two asynchronous all-reduces per
    sampled step combine them, so every rank reports the numbers of the whole gradient.
    Every rank must call ``watch()`` and ``mon.step()`` alike.

    Pipeline parallel (:mod:`gradscope.distributed.pipeline`): ``watch(stage)`` measures the
    stage's gradients after the schedule has accumulated and scaled its microbatches (call
    ``mon.step()`` after ``schedule.step()``, before ``optimizer.step()``); each stage reports
    its own layers, and one rank per stage writes its log into ``log_dir/stage-NNNNN``
    (``log_rank`` picks the pipeline whose ranks log), which :func:`gradscope.load_run` reads
    back, ``load_run(log_dir)``, as one run of the whole model. Rows must be named as in the
    unsplit model (``pipeline()``'s stages are): two stages with a row of the same name raise,
    and ``names=model`` is the fix.

    Raises:
        RuntimeError: ``model`` is already watched by a monitor that is not closed.
        ValueError / TypeError: an invalid argument (named in the message), or an unknown one.
    """
    try:
        chosen = WatchOptions(*args, **options)
    except TypeError as error:  # Python names WatchOptions.__init__() for unknown arguments: say watch()
        raise TypeError(str(error).replace("WatchOptions.__init__()", "watch()")) from None
    if not pipeline.is_stage(model):
        return Monitor(model, chosen)
    mode_given = "mode" in options or len(args) > 1  # mode is the second positional option
    return Monitor(model.submod, chosen.for_pipeline_stage(mode_given), stage=model)


watch.__signature__ = inspect.Signature(
    [
        inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=torch.nn.Module),
        *inspect.signature(WatchOptions).parameters.values(),
    ],
    return_annotation=Monitor,
)
