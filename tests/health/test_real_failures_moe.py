"""Mixtures of experts trained under ``gradscope.watch``: experts the router never chooses
are starved (``expert_starvation``), not ``dead``; an expert that is routed but whose ReLUs
never open is ``dead``; balanced routing is quiet.

The model is a hand-written top-2 router over 12 experts (``nn.ModuleList``). After the
first step, at which every expert is routed (so every expert has a ``.grad``), its router
biases shut three experts out of every step (a collapsed router); a bias of -1000 in front
of one expert's ReLU kills it. The test records which experts the router chose at each step,
in its own forward pass, and checks gradscope's presence of every expert's rows against that.
Both modes, and both ways of zeroing gradients: with ``zero_grad(set_to_none=False)`` the
unrouted experts' ``.grad`` holds zeros, which in ``mode="step"`` only the participation
marks tell from a dead layer's. A run log read back gives the same findings. A tiny Switch Transformer
from ``transformers`` (experts in an ``nn.ModuleDict``) is starved the same way.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import gradscope

EXPERTS, TOP_K, WIDTH, HIDDEN = 12, 2, 8, 16
SHUT_OUT = (2, 7, 9)  # the router never chooses these
DEAD = 5  # routed, but its first Linear's ReLU outputs are all zero
STEPS = 8


class TopKMoE(nn.Module):
    """``head(sum over the top-k experts of gate * expert(x))``; an expert no token is routed
    to is not called (as in Mixtral's and Switch Transformers' loops over experts).

    Attributes:
        routed: per forward pass, the set of experts at least one token was routed to.
    """

    def __init__(self, dead=None, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.router = nn.Linear(WIDTH, EXPERTS)
        self.experts = nn.ModuleList(
            nn.Sequential(
                OrderedDict(w_in=nn.Linear(WIDTH, HIDDEN), act=nn.ReLU(), w_out=nn.Linear(HIDDEN, WIDTH, bias=False))
            )
            for _ in range(EXPERTS)
        )
        self.head = nn.Linear(WIDTH, 1)
        self.routed: list[set[int]] = []
        with torch.no_grad():
            self.router.weight.mul_(0.1)
            self.router.bias.zero_()
            if dead is not None:
                self.experts[dead].w_in.bias.fill_(-1e3)

    @torch.no_grad()
    def shut_out(self, experts) -> None:
        """The router never chooses ``experts`` again (nor learns to: their logits are never
        among the top k, so they get no gradient)."""
        self.router.bias[list(experts)] = -1e4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, chosen = self.router(x).topk(TOP_K, dim=-1)
        gates = top.softmax(dim=-1)
        out = torch.zeros_like(x)
        self.routed.append(set(chosen.unique().tolist()))
        for e in sorted(self.routed[-1]):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            out = out.index_add(0, token, gates[token, slot, None] * self.experts[e](x[token]))
        return self.head(out)


def train(model: TopKMoE, mode: str, set_to_none: bool, shut_out=(), log_dir=None):
    """Eight SGD steps on a regression under ``watch(model, mode=mode)``, ``shut_out`` from
    the second on; returns the monitor's report and the history of ``present`` (read before
    closing)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    with gradscope.watch(model, mode=mode, optimizer=opt, log_dir=log_dir) as mon:
        for step in range(STEPS):
            if step == 1:
                model.shut_out(shut_out)
            x = torch.randn(32, WIDTH, generator=g)
            loss = (model(x).squeeze(1) - x[:, 0].sin()).square().mean()
            loss.backward()
            mon.step(loss=loss)
            opt.step()
            opt.zero_grad(set_to_none=set_to_none)
        return mon.report(wait=True), mon.history("present")


def expert_of(row: str) -> int | None:
    parts = row.split(".")
    return int(parts[1]) if parts[0] == "experts" else None


WAYS = [
    pytest.param(mode, set_to_none, id=f"{mode}-{'none' if set_to_none else 'zeros'}")
    for mode in ("backward", "step")
    for set_to_none in (True, False)
]


@pytest.mark.parametrize(("mode", "set_to_none"), WAYS)
def test_unrouted_experts_are_starved_not_dead_and_a_dead_expert_is_dead(one_thread, mode, set_to_none):
    model = TopKMoE(dead=DEAD)
    report, present = train(model, mode, set_to_none, shut_out=SHUT_OUT)

    # Each expert's rows are present exactly at the steps the router chose it (the test's own record).
    assert len(model.routed) == STEPS and all(DEAD in routed for routed in model.routed)
    assert model.routed[0] == set(range(EXPERTS)), "every expert has a .grad after the first step"
    assert all(not routed & set(SHUT_OUT) for routed in model.routed[1:])
    grads = [p.grad for e in SHUT_OUT for p in model.experts[e].parameters()]
    if set_to_none:
        assert all(grad is None for grad in grads)
    else:  # zeros that are no gradient of these steps
        assert all(grad is not None and not grad.any() for grad in grads)
    for r, row in enumerate(present.rows):
        e = expert_of(row)
        expected = [True] * STEPS if e is None else [e in routed for routed in model.routed]
        assert present.values[:, r].astype(bool).tolist() == expected, row

    dead = sorted(f.layer for f in report.findings if f.kind == "dead")
    assert dead == [f"experts.{DEAD}.w_in", f"experts.{DEAD}.w_out"], str(report)
    (starved,) = [f for f in report.findings if f.kind == "expert_starvation"]
    assert starved.layer == "experts"
    assert starved.evidence["experts"] == [f"experts.{e}" for e in SHUT_OUT]
    assert starved.evidence["fraction"] == 0.25 and starved.evidence["group_size"] == EXPERTS
    assert starved.evidence["sampled_steps"] == STEPS - 1 and starved.since_step == 1
    assert "3 of 12 experts of 'experts' (25%)" in starved.message
    assert {f.kind for f in report.findings} <= {"dead", "expert_starvation", "plateau", "fp8_range"}, str(report)


@pytest.mark.parametrize(("mode", "set_to_none"), WAYS)
def test_balanced_routing_is_quiet(one_thread, mode, set_to_none):
    """Every expert routed at some steps (32 tokens x top-2 over 12 experts: a few are left
    out of a step by chance, none for long): neither starved nor dead."""
    model = TopKMoE()
    report, _ = train(model, mode, set_to_none)
    assert set().union(*model.routed) == set(range(EXPERTS))
    assert not [f for f in report.findings if f.kind in ("dead", "expert_starvation")], str(report)


def test_a_loaded_run_log_gives_the_same_findings(one_thread, tmp_path):
    model = TopKMoE(dead=DEAD)
    report, _ = train(model, "step", set_to_none=False, shut_out=SHUT_OUT, log_dir=tmp_path)
    run = gradscope.load_run(tmp_path)
    assert run.info.sibling_groups == {"experts": tuple(str(e) for e in range(EXPERTS))}
    loaded = run.report()
    assert [f.to_dict() for f in loaded.findings] == [f.to_dict() for f in report.findings]
    assert {"dead", "expert_starvation"} <= {f.kind for f in loaded.findings}


def test_a_switch_transformer_with_unrouted_experts(one_thread):
    """``transformers``' Switch Transformers keep their experts in an ``nn.ModuleDict``
    (``expert_0``...) and call only the experts tokens were routed to: a tiny one, built from
    its config (nothing downloaded), with two experts of every sparse layer shut out after
    the first step, in step mode with ``zero_grad(set_to_none=False)``."""
    transformers = pytest.importorskip("transformers")
    config = transformers.SwitchTransformersConfig(
        vocab_size=64,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        num_experts=8,
        encoder_sparse_step=1,
        decoder_sparse_step=1,
        expert_capacity=64,
        router_bias=True,
        router_jitter_noise=0.0,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.SwitchTransformersForConditionalGeneration(config)
    layers = {name: m for name, m in model.named_modules() if name.endswith(".mlp") and hasattr(m, "router")}
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    shut_out = {}  # per sparse layer: two experts routed at the first step, never after
    with gradscope.watch(model, mode="step", optimizer=opt) as mon:
        for step in range(7):
            if step == 1:
                with torch.no_grad():
                    for name, layer in layers.items():
                        routed = [i for i in range(8) if layer.experts[f"expert_{i}"].wi.weight.grad is not None]
                        shut_out[name] = routed[:2]
                        layer.router.classifier.bias[routed[:2]] = -1e4
            ids = torch.randint(0, 64, (4, 12), generator=g)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            mon.step(loss=loss)
            opt.step()
            opt.zero_grad(set_to_none=False)
        report = mon.report(wait=True)
    assert len(layers) == 2 and all(len(experts) == 2 for experts in shut_out.values())
    for name, experts in shut_out.items():  # .grad holds zeros that are no gradient of these steps
        grads = [p.grad for i in experts for p in layers[name].experts[f"expert_{i}"].parameters()]
        assert all(grad is not None and not grad.any() for grad in grads)
    starved = {f.layer: f for f in report.findings if f.kind == "expert_starvation"}
    assert sorted(starved) == sorted(f"{name}.experts" for name in layers)
    for name, experts in shut_out.items():
        finding = starved[f"{name}.experts"]
        assert finding.evidence["experts"] == [f"{name}.experts.expert_{i}" for i in experts]
        assert finding.evidence["fraction"] == 0.25 and finding.evidence["sampled_steps"] == 6
    assert not [f for f in report.findings if f.kind == "dead"], str(report)
    assert np.isfinite(loss.item())
