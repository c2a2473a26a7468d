"""``Finding``: validation of kind and severity, default ``layers``, severity rank, plain-JSON
``to_dict``, and a suggestion for every kind in ``KINDS``."""

import ast
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from gradscope.health import checks
from gradscope.health.findings import KINDS, SEVERITIES, SUGGESTIONS, Finding


def make(**overrides) -> Finding:
    fields = {
        "kind": "dead",
        "severity": "warning",
        "layer": "fc1",
        "step": 7,
        "since_step": 3,
        "message": "almost all zero",
        "suggestion": SUGGESTIONS["dead"],
    }
    fields.update(overrides)
    return Finding(**fields)


def test_unknown_kind_is_rejected_by_name():
    with pytest.raises(ValueError, match="unknown finding kind 'exploded'"):
        make(kind="exploded")
    with pytest.raises(ValueError, match="'stalled_updates_low'"):
        make(kind="stalled_updates_low")  # a suggestion key, not a kind


def test_unknown_severity_is_rejected_by_name():
    with pytest.raises(ValueError, match="unknown severity 'error'"):
        make(severity="error")
    with pytest.raises(ValueError, match="'Warning'"):
        make(severity="Warning")  # case matters


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("severity", SEVERITIES)
def test_every_kind_and_severity_is_accepted(kind, severity):
    finding = make(kind=kind, severity=severity)
    assert (finding.kind, finding.severity) == (kind, severity)


def test_layers_default_to_the_layer_or_to_nothing():
    assert make(layer="fc1").layers == ("fc1",)
    assert make(layer=None).layers == ()
    assert make(layer="fc1", layers=("fc2", "fc1")).layers == ("fc2", "fc1")  # given layers are kept
    assert make(layer=None, layers=("a", "b")).layers == ("a", "b")


def test_evidence_defaults_to_a_fresh_dict():
    first, second = make(), make()
    assert first.evidence == {} and first.evidence is not second.evidence


def test_severity_level_orders_severities():
    ranks = {severity: make(severity=severity).severity_level for severity in ("info", "warning", "critical")}
    assert ranks == {"info": 0, "warning": 1, "critical": 2}
    # No attribute named like a process rank: in a distributed report ``finding.rank == 2``
    # read as "rank 2" while it meant "critical". The rank a NaN came from is evidence["rank"].
    assert not hasattr(make(severity="critical"), "rank")
    assert SEVERITIES == ("info", "warning", "critical")


def test_finding_is_frozen():
    finding = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        finding.severity = "critical"


def test_to_dict_carries_every_field_as_plain_json():
    finding = make(
        layer="fc2",
        step=np.int64(12),
        since_step=np.int32(4),
        evidence={"zero_frac": 1.0, "numel": 34, "layers": ["fc2"]},
        layers=("fc2", "fc1"),
    )
    data = finding.to_dict()
    assert set(data) == {f.name for f in dataclasses.fields(Finding)}
    assert data == {
        "kind": "dead",
        "severity": "warning",
        "layer": "fc2",
        "step": 12,
        "since_step": 4,
        "message": "almost all zero",
        "suggestion": SUGGESTIONS["dead"],
        "evidence": {"zero_frac": 1.0, "numel": 34, "layers": ["fc2"]},
        "layers": ["fc2", "fc1"],
        "cause": None,
    }
    assert type(data["step"]) is int and type(data["since_step"]) is int
    assert type(data["layers"]) is list
    assert json.loads(json.dumps(data)) == data  # no default= needed: plain JSON types only


def test_to_dict_of_a_finding_without_layer():
    data = make(kind="divergence", severity="critical", layer=None).to_dict()
    assert data["layer"] is None and data["layers"] == []
    assert json.loads(json.dumps(data))["layer"] is None


def test_kinds_are_exactly_those_the_checks_report():
    """Every kind a check can report is declared, and every declared kind is reported by a
    check: read from the checks' source (``Finding(kind="...")``), not copied here."""
    folder = Path(checks.__file__).parent
    reported = {
        node.value.value
        for path in folder.glob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.keyword) and node.arg == "kind" and isinstance(node.value, ast.Constant)
    }
    assert reported == set(KINDS)
    assert len(set(KINDS)) == len(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_a_suggestion(kind):
    if kind == "stalled_updates":
        keys = ["stalled_updates_low", "stalled_updates_high"]
        assert kind not in SUGGESTIONS  # only its two sides have advice
    else:
        keys = [kind]
    for key in keys:
        text = SUGGESTIONS[key]
        assert isinstance(text, str) and len(text) > 40, key
        assert text == text.strip() and text.endswith("."), key


def test_no_suggestion_without_a_kind():
    def kind_of(key: str) -> str:
        """A key is a kind, or a kind and a variant of its advice ("nonfinite_forward")."""
        owners = [kind for kind in KINDS if key == kind or key.startswith(kind + "_")]
        return max(owners, key=len) if owners else key

    assert {kind_of(key) for key in SUGGESTIONS} == set(KINDS)
    assert len(set(SUGGESTIONS.values())) == len(SUGGESTIONS)  # no advice is copied for two keys


def test_suggestions_speak_to_their_kind():
    assert "clip" in SUGGESTIONS["exploding"].lower()
    assert "learning rate" in SUGGESTIONS["stalled_updates_low"] and "Raise" in SUGGESTIONS["stalled_updates_low"]
    assert "Lower it" in SUGGESTIONS["stalled_updates_high"]
    assert "GradScaler" in SUGGESTIONS["overflow"]
    assert "detect_anomaly" in SUGGESTIONS["nonfinite"]
    assert "DDP" in SUGGESTIONS["rank_desync"]


def test_finding_is_exported_at_the_top_level():
    import gradscope

    assert gradscope.Finding is Finding
