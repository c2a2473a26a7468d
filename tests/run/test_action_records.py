"""Action records: what gradscope did about its findings, in the run and everywhere it shows.

What is tested: an ``action`` record survives its JSON line (``lr``, ``halt`` and ``stop``
with their details) and is kept by the run state; a real run that changes its learning rate,
stops early and halts logs the three, and the logged run reads them back as the live
monitor reports them; and they appear in the printed report ("actions taken"), its
``to_dict()``, the visual report's loss panel (one solid line and label each) and the HTML
page (the ``actions`` table). Runs without actions show none of these.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math

import numpy as np
import pytest
import torch
from run_builders import run_info
from torch import nn

import gradscope
from gradscope.outputs.html_page import html_report
from gradscope.outputs.visual import RunData, figure
from gradscope.run import records
from gradscope.run.state import KEPT_ACTIONS, RunState

LR = records.Action(
    412,
    "lr",
    "lr 0.003 -> 0.0015 at step 412 because exploding in 'blocks.3': the rms is 40 above the ceiling 10",
    {
        "old": 0.003,
        "new": 0.0015,
        "old_scale": 1.0,
        "scale": 0.5,
        "groups": 2,
        "because": {"kind": "exploding", "layer": "blocks.3", "step": 410},
    },
)
LAYER = records.Action(
    90,
    "lr",
    "updates of 'head' x1 -> x0.5 at step 90 because its update/weight ratio 0.31 is above 0.1",
    {
        "layers": ["head"],
        "old_scale": 1.0,
        "scale": 0.5,
        "because": {"kind": "stalled_updates", "layer": "head", "step": 88},
    },
)
HALT = records.Action(
    7,
    "halt",
    "halted at step 7 because nonfinite in 'fc': NaN/Inf gradients first at step 7",
    {"because": {"kind": "nonfinite", "layer": "fc", "step": 7}},
)
STOP = records.Action(
    250,
    "stop",
    "early stop at step 250: val_loss has not improved for 5 evaluations; best 0.31 at step 125",
    {"metric": "val_loss", "best_step": 125, "best_value": 0.31},
)
NOT_FINITE_LR = records.Action(3, "lr", "lr nan -> nan", {"old": None, "new": None, "because": {"layer": None}})


@pytest.mark.parametrize("action", [LR, LAYER, HALT, STOP, NOT_FINITE_LR], ids=["lr", "layer", "halt", "stop", "none"])
def test_an_action_survives_its_json_line(action):
    line = records.encode(action)
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["t"] == "action" and obj["action"] == action.action and obj["step"] == action.step
    back = records.decode(line)
    assert isinstance(back, records.Action)
    assert back == action


def test_an_action_without_detail_reads_as_an_empty_detail():
    assert records.Action(5, "stop", "stopped").detail == {}
    assert records.decode('{"t":"action","step":5,"action":"stop","message":"stopped"}') == records.Action(
        5, "stop", "stopped", {}
    )
    assert records.decode(records.encode(records.Action(5, "halt", "halted"))).detail == {}


def test_the_run_state_keeps_actions_in_order_up_to_its_limit():
    state = RunState(run_info(["a", "b"], numel=4))
    for action in (HALT, LAYER, LR):
        state.apply(action)
    assert state.actions == [HALT, LAYER, LR]
    for step in range(KEPT_ACTIONS + 5):
        state.apply(records.Action(step, "lr", f"change {step}"))
    assert len(state.actions) == KEPT_ACTIONS
    assert state.actions[:3] == [HALT, LAYER, LR]  # the first ones are kept, the excess dropped


# --------------------------------------------------------------------------------------
# A real run that acts three times
# --------------------------------------------------------------------------------------

SPIKE_STEP, NAN_STEP = 40, 60


def acting_run(log_dir):
    """A small regression under watch with a learning-rate controller (loss spikes only),
    early stopping on a val_loss that gets worse from the first evaluation (patience 2), and
    ``halt_on="nonfinite"``: the reported loss spikes 10x at step 40 (lr cut), the stop comes
    at step 29, and a NaN at step 60 halts the run."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    options = {
        "log_dir": log_dir,
        "adapt_lr": gradscope.AdaptiveLR(on=("loss_spike",)),
        "early_stopping": gradscope.EarlyStopping(patience=2),
        "halt_on": "nonfinite",
    }
    halted = None
    with gradscope.watch(model, optimizer=opt, **options) as mon:
        for step in range(100):
            x = torch.randn(32, 8, generator=g)
            loss = nn.functional.mse_loss(model(x), torch.sin(x[:, :1]))
            if step == NAN_STEP:
                loss = loss * math.nan
            loss.backward()
            try:
                mon.step(loss=loss * 10 if step == SPIKE_STEP else loss)
            except gradscope.TrainingHalted as halt:
                halted = halt
                break
            opt.step()
            opt.zero_grad()
            if step % 10 == 9:
                mon.log(val_loss=1.0 + step / 100)
    return mon, halted


@pytest.fixture(scope="module")
def acted(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("acted")
    mon, halted = acting_run(log_dir)
    return mon, halted, log_dir


@pytest.fixture(scope="module")
def quiet(tmp_path_factory):
    """The same run without actions asked for."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    with gradscope.watch(model, optimizer=opt, log_dir=tmp_path_factory.mktemp("quiet")) as mon:
        for _ in range(40):
            x = torch.randn(32, 8, generator=g)
            loss = nn.functional.mse_loss(model(x), torch.sin(x[:, :1]))
            loss.backward()
            mon.step(loss=loss)
            opt.step()
            opt.zero_grad()
    return mon


def test_the_run_acts_three_times_in_step_order(acted):
    mon, halted, _ = acted
    actions = mon.report().actions
    assert [(a["step"], a["action"]) for a in actions] == [(29, "stop"), (SPIKE_STEP, "lr"), (NAN_STEP, "halt")]
    stop, cut, halt = actions
    assert stop["message"].startswith("early stop at step 29: val_loss has not improved for 2 evaluations")
    assert stop["detail"] == {"metric": "val_loss", "best_step": 9, "best_value": pytest.approx(1.09)}
    assert cut["message"].startswith(f"lr 0.05 -> 0.025 at step {SPIKE_STEP} because loss_spike: the loss spiked")
    assert cut["detail"]["because"] == {"kind": "loss_spike", "layer": None, "step": SPIKE_STEP}
    assert halt["message"].startswith(f"halted at step {NAN_STEP} because nonfinite")
    assert halted is not None and halted.step == NAN_STEP
    assert mon.lr_scale == 0.5 and mon.should_stop


def test_the_logged_run_reads_back_the_live_actions(acted):
    mon, _, log_dir = acted
    live = mon.report().actions
    loaded = gradscope.load_run(log_dir).report().actions
    assert len(live) == 3
    assert loaded == live


def test_the_log_holds_one_action_line_per_action(acted):
    _, _, log_dir = acted
    lines = [json.loads(line) for file in sorted(log_dir.glob("*.jsonl")) for line in file.read_text().splitlines()]
    assert [(obj["step"], obj["action"]) for obj in lines if obj["t"] == "action"] == [
        (29, "stop"),
        (SPIKE_STEP, "lr"),
        (NAN_STEP, "halt"),
    ]


def test_a_log_with_action_records_declares_a_newer_schema(acted):
    _, _, log_dir = acted
    (file,) = sorted(log_dir.glob("*.jsonl"))
    header = records.decode(file.read_text().splitlines()[0])
    assert header.schema >= 4


def test_the_printed_report_lists_the_actions_taken(acted, quiet):
    mon, _, _ = acted
    report = mon.report()
    text = str(report)
    assert "  actions taken:" in text
    listed = text.split("  actions taken:\n", 1)[1].splitlines()[:3]
    assert listed == [f"    {a['message']}" for a in report.actions]
    assert "actions taken" not in str(quiet.report())


def test_the_report_dict_carries_the_actions(acted, quiet):
    mon, _, _ = acted
    report = mon.report()
    as_dict = report.to_dict()
    assert as_dict["actions"] == list(report.actions)
    assert json.loads(json.dumps(as_dict))["actions"] == list(report.actions)  # plain JSON
    assert quiet.report().to_dict()["actions"] == []
    assert quiet.report().actions == ()


def action_lines(ax) -> dict[float, str]:
    """The loss panel's solid vertical lines: step -> colour."""
    out = {}
    for line in ax.lines:
        x = np.asarray(line.get_xdata(), dtype=float)
        if line.get_linestyle() == "-" and len(x) == 2 and x[0] == x[1]:
            out[float(x[0])] = line.get_color()
    return out


def test_the_loss_panel_draws_one_solid_line_and_label_per_action(acted, quiet):
    pytest.importorskip("matplotlib")
    mon, _, _ = acted
    ax = figure(RunData.of(mon), "loss").axes[0]
    lines = action_lines(ax)
    assert sorted(lines) == [29.0, float(SPIKE_STEP), float(NAN_STEP)]
    assert len(set(lines.values())) == 3  # a colour per kind of action
    labels = [text.get_text() for text in ax.texts]
    for label in ("early stop", "lr x0.5", "halted"):
        assert labels.count(label) == 1, labels
    quiet_ax = figure(RunData.of(quiet), "loss").axes[0]
    assert action_lines(quiet_ax) == {}
    assert not {"early stop", "lr x0.5", "halted"} & {text.get_text() for text in quiet_ax.texts}


def test_the_loss_panel_labels_a_layers_update_scale_with_the_layer(acted):
    pytest.importorskip("matplotlib")
    mon, _, _ = acted
    report = mon.report()
    layer_action = {"step": LAYER.step, "action": "lr", "message": LAYER.message, "detail": LAYER.detail}
    with_layer = dataclasses.replace(report, actions=(layer_action,))
    ax = figure(RunData.of(mon, with_layer), "loss").axes[0]
    assert sorted(action_lines(ax)) == [float(LAYER.step)]
    assert "lr x0.5 head" in [text.get_text() for text in ax.texts]


def test_the_html_page_has_an_actions_table(acted, quiet):
    pytest.importorskip("matplotlib")
    mon, _, _ = acted
    page = html_report(mon)
    assert '<table id="actions">' in page
    table = page.split('<table id="actions">', 1)[1].split("</table>", 1)[0]
    assert table.count('<tr class="action">') == 3
    for action in mon.report().actions:
        assert html.escape(action["message"]) in table
    assert 'id="actions"' not in html_report(quiet)
