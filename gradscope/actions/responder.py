"""The monitor's responder: from findings to what the user asked for, at ``mon.step()``.

It owns the actions a :class:`gradscope.Monitor` was given — ``on_finding``, ``halt_on``,
``early_stopping``, ``adapt_lr`` — and is driven by the monitor in two places:

* :meth:`Responder.observe` sees each record as it reaches the host (screening for alarms,
  :mod:`gradscope.actions.cadence`; feeding early stopping), in microseconds;
* :meth:`Responder.respond`, at the end of ``mon.step()``, judges the run when an alarm or
  the time budget says so, and then calls ``on_finding`` once per new or risen finding
  (:mod:`gradscope.actions.novelty`), lets the learning-rate controller decide, and returns
  the :class:`~gradscope.actions.halting.TrainingHalted` to raise when a finding matches
  ``halt_on``.

Nothing here synchronises with a device: findings are judged from what has already reached
the host. A failure here (a broken callback included) is reported through ``report_error``
and never reaches training; only a ``TrainingHalted`` raised by the user's own callback does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from gradscope.actions.adaptive_lr import AdaptiveLR, LrController
from gradscope.actions.cadence import Cadence, Screen
from gradscope.actions.consensus import BEST_STEP, BEST_VALUE, FIXED, HALT, SCALE, STOP, Consensus
from gradscope.actions.early_stopping import EarlyStopper, EarlyStopping
from gradscope.actions.halting import HaltRule, TrainingHalted
from gradscope.actions.novelty import NewFindings
from gradscope.health.findings import SUGGESTIONS, Finding
from gradscope.health.report import judge
from gradscope.health.thresholds import Thresholds
from gradscope.health.view import RunView
from gradscope.run import records


class Responder:
    """The actions of one monitor (see the module docstring).

    Args:
        on_finding: the user's callback, or None.
        halt_rule: which findings halt the run, or None.
        early_stopping: early stopping's settings, or None.
        adapt_lr: the learning-rate controller's settings, or None.
        optimizer: the optimizer the controller changes (required with ``adapt_lr``).
        rows, row_params: the monitor's rows and each row's parameters (per-layer control).
        thresholds: the run's thresholds (spike rules of the screen).
        report_error: ``(key, message)``: record a failure here (and warn once per key).
        decider: in a distributed run, the global rank that decides (:mod:`gradscope.actions.consensus`);
            None in a single process.
    """

    def __init__(
        self,
        on_finding: Callable[[Finding], object] | None,
        halt_rule: HaltRule | None,
        early_stopping: EarlyStopping | None,
        adapt_lr: AdaptiveLR | None,
        optimizer: torch.optim.Optimizer | None,
        rows: Sequence[str],
        row_params: Sequence[Sequence[torch.Tensor]],
        thresholds: Thresholds,
        report_error: Callable[[str, str], None],
        decider: int | None = None,
    ) -> None:
        self.on_finding, self.halt_rule = on_finding, halt_rule
        self.stopper = EarlyStopper(early_stopping) if early_stopping is not None else None
        self.lr = LrController(adapt_lr, optimizer, rows, row_params) if adapt_lr is not None else None
        self.consensus = Consensus(decider, len(rows)) if decider is not None else None
        self.decides = self.consensus is None or self.consensus.is_decider
        self.judges = self.decides and (on_finding is not None or halt_rule is not None or self.lr is not None)
        rise = adapt_lr.rise if adapt_lr is not None and "divergence" in adapt_lr.on else None
        self.screen = Screen(thresholds, rise, adapt_lr.window if adapt_lr is not None else 1)
        self.thresholds = thresholds
        self.cadence = Cadence()
        self.novelty = NewFindings()
        self.halted: TrainingHalted | None = None
        self.judgements = 0
        self.shared_stop: tuple[int | None, float | None] | None = None  # distributed, once stopped: best step, value
        self._proposed_halt: TrainingHalted | None = None  # distributed: decided, applied at the next step
        self._report_error = report_error

    # ---- records ------------------------------------------------------------------------

    def observe(self, record: records.Record) -> list[records.Action]:
        """Screen a record that just reached the host; returns the actions it causes (a stop)."""
        out = []
        try:
            if self.judges:
                self.screen.observe(record)
            if self.stopper is not None:
                action, warning = self.stopper.observe(record)
                if warning:
                    self._report_error("early-stopping-metric", warning)
                if action is not None and self.decides:
                    out.append(action)
        except Exception as error:
            self._report_error("responder", f"gradscope: acting on findings failed ({type(error).__name__}: {error})")
        return out

    # ---- the end of a step ----------------------------------------------------------------

    def respond(
        self, step: int, view_of: Callable[[], RunView | None], report_of: Callable[[], object]
    ) -> tuple[list[records.Action], TrainingHalted | None]:
        """After ``mon.step()`` closed ``step``: judge if due, and act. Returns the action
        records to emit and the exception to raise (or None)."""
        actions, halt = [], None
        if self.judges and self.cadence.due(self.screen.alarm):
            actions, halt = self._judge(step, view_of, report_of)
        if self.consensus is not None:
            try:
                halt = self._agree(step, halt, report_of)  # every rank, every step: the same collectives
            except Exception as error:  # e.g. the process group is gone: this rank's own halt stands (fail closed)
                message = f"gradscope: sharing a decision between ranks failed ({type(error).__name__}: {error})"
                self._report_error("consensus", message)
        elif self.lr is not None:
            self.lr.apply()
        if halt is not None:
            self.halted = halt
            actions.append(_halt_record(step, halt))
        return actions, halt

    def _judge(self, step: int, view_of, report_of) -> tuple[list[records.Action], TrainingHalted | None]:
        actions, halt = [], None
        started = time.perf_counter()
        try:
            self.screen.alarm = False
            view = view_of()
            findings = judge(view, self.thresholds)[0] if view is not None else []
            self.judgements += 1
            for finding in self.novelty.update(findings):
                raised = self._announce(finding)  # every new finding is announced, halt or not
                halt = halt or raised
                if halt is None and self.halt_rule is not None and self.halt_rule.matches(finding):
                    halt = TrainingHalted(finding, report_of(), step)
            if halt is None:
                halt = self._halt_again(findings, step, report_of)
            if self.lr is not None:
                actions += self.lr.decide(findings, view, self.thresholds, self.screen.loss_spike, step)
        except Exception as error:
            self._report_error("responder", f"gradscope: acting on findings failed ({type(error).__name__}: {error})")
            halt = halt or self._halt_without_findings(step, error)
        finally:
            self.cadence.judged(started)
        return actions, halt

    def _halt_without_findings(self, step: int, error: Exception) -> TrainingHalted | None:
        """Judging failed (a bug in gradscope's checks): the halt the user asked for on NaN/Inf
        must not silently lapse. The screen saw NaN/Inf arrive on its own (no checks needed):
        halt with a plain ``nonfinite`` finding, and whatever report can still be made."""
        rule, episode = self.halt_rule, self.screen.episode
        if rule is None or not rule.halts_on_nonfinite or episode is None:
            return None
        if self.halted is not None and episode <= self.halted.step:
            return None  # the loop caught that halt and went on; a new NaN episode halts again
        finding = Finding(
            kind="nonfinite",
            severity="critical",
            layer=None,
            step=step,
            since_step=episode,
            message=(
                f"NaN/Inf appeared at step {episode} (the health checks failed, {type(error).__name__}: {error}, "
                "so which layer is not known; halting as halt_on asks)"
            ),
            suggestion=SUGGESTIONS["nonfinite"],
            evidence={"checks_failed": f"{type(error).__name__}: {error}"},
        )
        return TrainingHalted(finding, None, step)

    def _halt_again(self, findings, step: int, report_of) -> TrainingHalted | None:
        """NaN/Inf again after a halt the loop caught and went on from, with finite gradients in
        between: a new event, although the report's ``nonfinite`` finding still names the first."""
        event = self.screen.episode
        if self.halted is None or self.halt_rule is None or event is None or event <= self.halted.step:
            return None
        for finding in findings:
            if finding.kind == "nonfinite" and self.halt_rule.matches(finding):
                return TrainingHalted(finding, report_of(), step)
        return None

    def _agree(self, step: int, halt: TrainingHalted | None, report_of) -> TrainingHalted | None:
        """Distributed: send the decider's latest decision, and apply the one sent at the
        previous step, which every rank receives alike."""
        if halt is not None and self._proposed_halt is None:
            self._proposed_halt = halt
        decided = self.consensus.exchange(self._proposal() if self.decides else None)
        if decided is None:
            return None
        if self.lr is not None:
            layers = {r: float(v) for r, v in enumerate(decided[FIXED:]) if v != 1.0}
            self.lr.apply(float(decided[SCALE]), layers)
        if decided[STOP]:
            best_step = None if np.isnan(decided[BEST_STEP]) else int(decided[BEST_STEP])
            best_value = None if np.isnan(decided[BEST_VALUE]) else float(decided[BEST_VALUE])
            self.shared_stop = (best_step, best_value)
        if not decided[HALT] or self.halted is not None:
            return None
        finding = self.consensus.share_halt(self._proposed_halt.finding if self.decides else None)
        if self.decides:
            return TrainingHalted(finding, self._proposed_halt.report, step)
        return TrainingHalted(finding, report_of(), step)

    def _proposal(self) -> np.ndarray:
        vector = np.ones(self.consensus.size)
        vector[HALT] = self._proposed_halt is not None
        stopper = self.stopper
        vector[STOP] = stopper is not None and stopper.should_stop
        best = (stopper.best_step, stopper.best_value) if stopper is not None else (None, None)
        vector[BEST_STEP] = np.nan if best[0] is None else best[0]
        vector[BEST_VALUE] = np.nan if best[1] is None else best[1]
        vector[SCALE] = self.lr.target_scale if self.lr is not None else 1.0
        if self.lr is not None:
            for row, scale in self.lr.target_layer_scale.items():
                vector[FIXED + row] = scale
        return vector

    def _announce(self, finding: Finding) -> TrainingHalted | None:
        """Call ``on_finding``; a ``TrainingHalted`` it raises is returned (the user's own halt)."""
        if self.on_finding is None:
            return None
        try:
            self.on_finding(finding)
        except TrainingHalted as halt:
            return halt
        except Exception as error:
            self._report_error(
                "on_finding",
                f"gradscope: on_finding raised {type(error).__name__}: {error} (for the {finding.kind} finding at "
                f"step {finding.step}); training goes on, later failures are listed in mon.errors",
            )
        return None

    def close(self) -> None:
        if self.lr is not None:
            self.lr.close()
        if self.consensus is not None:
            self.consensus.close()


def _halt_record(step: int, halt: TrainingHalted) -> records.Action:
    where = f" in '{halt.finding.layer}'" if halt.finding.layer else ""
    because = {"kind": halt.finding.kind, "layer": halt.finding.layer, "step": int(halt.finding.step)}
    message = f"halted at step {step} because {halt.finding.kind}{where}: {halt.finding.message}"
    return records.Action(step, "halt", message, {"because": because})
