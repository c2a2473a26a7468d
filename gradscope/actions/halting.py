"""Halting a run on a finding: ``watch(..., halt_on=...)`` and :class:`TrainingHalted`.

``halt_on`` names finding kinds (:data:`gradscope.health.findings.KINDS`) and/or severities
(``"warning"``, ``"critical"``; a severity matches that severity and above). ``mon.step()``
raises :class:`TrainingHalted` at the first step at which a matching finding is new or has
risen to a matching severity (:mod:`gradscope.actions.novelty`); a run that catches it and goes
on is not halted again for the same finding.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gradscope.health.findings import KINDS, SEVERITIES, Finding


class TrainingHalted(RuntimeError):
    """Raised by ``mon.step()`` when a finding named by ``halt_on`` appears.

    Attributes:
        finding: the :class:`~gradscope.Finding` that halted the run.
        report: the :class:`~gradscope.HealthReport` at that step (None when gradscope's health
            checks themselves failed and it halted on the NaN/Inf it saw arrive).
        step: the step whose ``mon.step()`` raised (the finding's evidence may be a step or
            two older on CUDA, where statistics reach the host asynchronously).
    """

    def __init__(self, finding: Finding, report, step: int) -> None:
        where = f" in '{finding.layer}'" if finding.layer else ""
        super().__init__(
            f"gradscope halted training at step {step}: [{finding.severity}] {finding.kind}{where} "
            f"(since step {finding.since_step}): {finding.message}"
        )
        self.finding, self.report, self.step = finding, report, step

    def __reduce__(self):  # picklable (multiprocessing, Lightning's error handling)
        return (TrainingHalted, (self.finding, self.report, self.step))


@dataclass(frozen=True)
class HaltRule:
    """Which findings halt a run: any of ``kinds``, or a severity at or above ``min_severity``."""

    kinds: frozenset[str] = frozenset()
    min_severity: str | None = None

    @classmethod
    def parse(cls, halt_on: str | Iterable[str] | None) -> HaltRule | None:
        """``halt_on`` as given to ``watch`` (a name, or several); None when it is None or empty.

        Raises:
            TypeError / ValueError: not strings, ``"info"`` (every plateau would halt), or a
                name that is neither a kind nor a severity (the message lists both).
        """
        if halt_on is None:
            return None
        names = (halt_on,) if isinstance(halt_on, str) else halt_on
        if not isinstance(names, Iterable) or isinstance(names, bytes):
            raise TypeError(f"watch: halt_on must be a finding kind or severity, or a list of them, got {halt_on!r}")
        kinds, severities = set(), []
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"watch: halt_on entries must be strings, got {name!r}")
            if name in KINDS:
                kinds.add(name)
            elif name in ("warning", "critical"):
                severities.append(name)
            elif name == "info":
                raise ValueError("watch: halt_on='info' would halt on every informational finding (a plateau)")
            else:
                raise ValueError(
                    f"watch: halt_on: unknown finding kind or severity {name!r}; kinds are {', '.join(KINDS)}; "
                    "severities are 'warning' and 'critical'"
                )
        if not kinds and not severities:
            return None
        lowest = min(severities, key=SEVERITIES.index) if severities else None
        return cls(frozenset(kinds), lowest)

    @property
    def halts_on_nonfinite(self) -> bool:
        """Whether a NaN/Inf finding (``nonfinite``, critical) halts: then the step it appears in
        must be judged before its optimizer update."""
        return "nonfinite" in self.kinds or self.min_severity is not None

    def matches(self, finding: Finding) -> bool:
        if finding.kind in self.kinds:
            return True
        return self.min_severity is not None and finding.severity_level >= SEVERITIES.index(self.min_severity)
