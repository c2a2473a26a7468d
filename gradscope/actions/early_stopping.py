"""Early stopping: stop when a monitored metric has not improved for ``patience`` evaluations.

``watch(..., early_stopping=EarlyStopping(metric="val_loss", patience=5, min_delta=0.0))``
(or ``early_stopping=True`` for these defaults). Each value of the metric that reaches the
monitor — ``mon.log(val_loss=...)``, or ``mon.step(..., val_loss=...)`` — is one evaluation.
Whether a value improves is the rule the ``plateau`` check uses
(:mod:`gradscope.health.progress`): better than the value at the last improvement by more
than ``min_delta``. Once ``patience`` evaluations in a row have not improved, or the metric is
NaN/Inf, ``mon.should_stop`` turns True (and stays True) with ``mon.stop_reason``;
``mon.best_step`` and ``mon.best_value`` name the evaluation to restore (the best value
seen, at the step ``mon.log`` attached it to).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from gradscope.health.checks.loss import direction
from gradscope.health.progress import Progress
from gradscope.run import records

DIRECTIONS = {"min": -1, "max": 1}


@dataclass(frozen=True)
class EarlyStopping:
    """Early stopping's settings (see the module docstring).

    Attributes:
        metric: the metric to watch, as logged (default ``"val_loss"``).
        patience: evaluations without improvement before stopping (>= 1).
        min_delta: how much better than the value at the last improvement a value must be to
            count as improving, in the metric's units (>= 0).
        direction: ``"min"`` (lower is better) or ``"max"``; None infers it from the name
            as the health report does (``loss``/``error``: min; ``accuracy``/``f1``/
            ``recall``/``precision``: max).
    """

    metric: str = "val_loss"
    patience: int = 5
    min_delta: float = 0.0
    direction: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise TypeError(f"EarlyStopping: metric must be a metric name, got {self.metric!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"EarlyStopping: patience must be an integer >= 1, got {self.patience!r}")
        delta = self.min_delta
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 <= delta < math.inf:
            raise ValueError(f"EarlyStopping: min_delta must be a finite number >= 0, got {delta!r}")
        if self.direction is not None and self.direction not in DIRECTIONS:
            raise ValueError(f"EarlyStopping: direction must be 'min', 'max' or None, got {self.direction!r}")
        if self.direction is None and direction(self.metric) == 0:
            raise ValueError(
                f"EarlyStopping: cannot tell whether higher or lower {self.metric!r} is better: "
                "pass direction='min' or direction='max'"
            )

    @property
    def sign(self) -> int:
        """+1 if higher is better, -1 if lower is better."""
        return DIRECTIONS[self.direction] if self.direction else direction(self.metric)


class EarlyStopper:
    """Early stopping's running state, fed the run's records as they arrive (O(1) each)."""

    def __init__(self, config: EarlyStopping) -> None:
        self.config = config
        self.progress = Progress(sign=config.sign, min_delta=float(config.min_delta))
        self.should_stop = False
        self.reason: str | None = None
        self._evaluated = False
        self._missing_warned = False

    @property
    def best_step(self) -> int | None:
        return self.progress.best_key

    @property
    def best_value(self) -> float | None:
        return self.progress.best

    def state_dict(self) -> dict:
        """What a checkpoint keeps (plain Python values): the metric's progress and the stop."""
        progress = dataclasses.asdict(self.progress)
        return {"progress": progress, "should_stop": self.should_stop, "reason": self.reason}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` (the watched metric's direction and margin stay this run's)."""
        kept = {k: v for k, v in state["progress"].items() if k not in ("sign", "min_delta", "tolerance")}
        self.progress = dataclasses.replace(self.progress, **kept)
        self.should_stop, self.reason = bool(state["should_stop"]), state["reason"]
        self._evaluated = self.progress.count > 0

    def observe(self, record: records.Record) -> tuple[records.Action | None, str | None]:
        """Take a record; returns the stop action (the first time the run should stop) and a
        warning to give once (an evaluation arrived without the watched metric)."""
        if not isinstance(record, (records.Metrics, records.StepValues)):
            return None, None
        name = self.config.metric
        if name not in record.values:
            if isinstance(record, records.Metrics) and not self._evaluated and not self._missing_warned:
                self._missing_warned = True
                logged = ", ".join(sorted(record.values)) or "nothing"
                return None, (
                    f"gradscope: early stopping watches {name!r}, but the first evaluation (mon.log at step "
                    f"{record.step}) logged {logged}: log it as mon.log({name}=...) or set EarlyStopping(metric=...)"
                )
            return None, None
        self._evaluated = True
        value = float(record.values[name])
        self.progress.update(value, int(record.step))
        if self.should_stop:
            return None, None
        if not math.isfinite(value):
            self.reason = f"{name} is {value} at step {record.step}"
        elif self.progress.waited >= self.config.patience:
            best = self.progress.best
            by = f" by more than {self.config.min_delta:g}" if self.config.min_delta else ""
            self.reason = (
                f"{name} has not improved{by} for {self.progress.waited} "
                f"evaluations; best {best:.6g} at step {self.best_step}"
            )
        else:
            return None, None
        self.should_stop = True
        detail = {"metric": name, "best_step": self.best_step, "best_value": self.best_value}
        return records.Action(
            int(record.step), "stop", f"early stop at step {record.step}: {self.reason}", detail
        ), None
