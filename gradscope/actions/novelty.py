"""Which findings are new: ``on_finding`` and halting act once per finding, not once per step.

A finding is the same finding from one judgement to the next when its :func:`identity` is:
its kind, its layer, and what distinguishes findings of one kind (the metric of a plateau,
the pass of a non-finite value, the side of stalled updates, the rule of an exploding
gradient: ceiling, spike or trend). A finding is *new* the first time its identity is seen,
and again only after it has been absent from a judgement and comes back with a later
``since_step`` (the problem ended and happened again); it is *risen* when its severity is
above every severity it was announced with.
"""

from __future__ import annotations

from dataclasses import dataclass

from gradscope.health.findings import Finding

_DISTINGUISHING = ("metric", "pass", "side", "dtype", "rule")
"""Evidence keys that tell two findings of one kind (and layer) apart."""


def identity(finding: Finding) -> tuple:
    """What makes ``finding`` the same finding as one of an earlier judgement."""
    evidence = finding.evidence or {}
    detail = tuple((key, str(evidence[key])) for key in _DISTINGUISHING if key in evidence)
    if finding.kind == "exploding":
        rule = "ceiling" if "ceiling" in evidence else "spike" if "spike_steps" in evidence else "trend"
        detail += (("exploding", rule),)
    return (finding.kind, finding.layer, detail)


@dataclass
class _Seen:
    level: int  # highest severity level announced in the current episode
    step: int  # the finding's latest step when last judged
    active: bool  # present at the latest judgement


class NewFindings:
    """Remembers the findings announced so far (one entry per identity)."""

    def __init__(self) -> None:
        self._seen: dict[tuple, _Seen] = {}

    def update(self, findings: list[Finding] | tuple[Finding, ...]) -> list[Finding]:
        """The findings of this judgement that are new or have risen, in the given order."""
        out, now = [], set()
        for finding in findings:
            key = identity(finding)
            if key in now:
                continue  # two findings with one identity in one judgement: the first speaks for both
            now.add(key)
            seen = self._seen.get(key)
            if seen is None or (not seen.active and finding.since_step > seen.step):
                self._seen[key] = _Seen(finding.severity_level, finding.step, True)
                out.append(finding)
                continue
            if finding.severity_level > seen.level:
                seen.level = finding.severity_level
                out.append(finding)
            seen.step, seen.active = max(seen.step, finding.step), True
        for key, seen in self._seen.items():
            if key not in now:
                seen.active = False
        return out
