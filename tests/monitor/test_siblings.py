"""Sibling groups (``gradscope.monitor.siblings``): the experts of a mixture of experts found
in real ``torch.nn`` models from their containers and parameter shapes, and what is not a
group (named parts with equal shapes, frozen or unwatched siblings, different shapes)."""

from collections import OrderedDict

import torch
from torch import nn

import gradscope
from gradscope.monitor.siblings import sibling_groups
from gradscope.monitor.watched import select


def expert(d: int = 4, h: int = 8) -> nn.Module:
    return nn.Sequential(OrderedDict(w_in=nn.Linear(d, h), act=nn.ReLU(), w_out=nn.Linear(h, d, bias=False)))


class MoE(nn.Module):
    def __init__(self, experts: int = 6) -> None:
        super().__init__()
        self.router = nn.Linear(4, experts)
        self.experts = nn.ModuleList(expert() for _ in range(experts))


def groups_of(model: nn.Module, params=None) -> dict:
    return sibling_groups(model, select(model, params))


def test_experts_in_a_module_list_and_layers_in_a_stack():
    model = nn.Module()
    model.layers = nn.ModuleList(MoE() for _ in range(2))
    assert groups_of(model) == {
        "layers": ("0", "1"),
        "layers.0.experts": ("0", "1", "2", "3", "4", "5"),
        "layers.1.experts": ("0", "1", "2", "3", "4", "5"),
    }


def test_experts_in_a_module_dict_as_switch_transformers_keeps_them():
    model = nn.Module()
    model.experts = nn.ModuleDict({f"expert_{i}": expert() for i in range(4)})
    assert groups_of(model) == {"experts": ("expert_0", "expert_1", "expert_2", "expert_3")}


def test_numbered_children_of_any_module_form_a_group_named_parts_do_not():
    """``nn.Sequential``'s numbered children are a collection; q/k/v/o projections of equal
    shapes are named parts of an attention block, not siblings of a collection."""
    stack = nn.Sequential(*(nn.Linear(4, 4) for _ in range(4)))
    assert groups_of(stack) == {"": ("0", "1", "2", "3")}
    attention = nn.Module()
    for name in ("q", "k", "v", "o"):
        setattr(attention, name, nn.Linear(4, 4))
    assert groups_of(attention) == {}


def test_the_largest_set_of_identical_siblings_is_the_group():
    """A container mixing shapes (a shared expert of another width, activations without
    parameters): the largest set with identical parameter names and shapes."""
    model = nn.Module()
    model.experts = nn.ModuleList([expert(h=16), expert(), nn.ReLU(), expert(), expert(), expert(h=16)])
    assert groups_of(model) == {"experts": ("1", "3", "4")}
    model.experts = nn.ModuleList([expert(), expert(h=16)])
    assert groups_of(model) == {}, "no two siblings alike"


def test_frozen_and_unwatched_siblings_are_left_out():
    """A frozen sibling cannot be starved of gradient (a partly frozen stack of blocks is
    no mixture of experts with starved members); the signature is of watched parameters."""
    model = MoE(experts=6)
    for e in (0, 1):
        model.experts[e].requires_grad_(False)
    assert groups_of(model) == {"experts": ("2", "3", "4", "5")}
    assert groups_of(model, params="experts.[2-3].*") == {"experts": ("2", "3")}
    model.experts[4].w_out.requires_grad_(False)  # part frozen: another signature
    assert groups_of(model) == {"experts": ("2", "3", "5")}


def test_watch_records_the_groups_of_the_model_also_compiled():
    """What ``watch()`` records with the run (``RunInfo.sibling_groups``), for the model that
    ``torch.compile`` wraps (its module names are the rows' prefixes)."""
    model = MoE()
    for watched in (model, torch.compile(model)):
        with gradscope.watch(watched) as mon:
            assert mon.info.sibling_groups == {"experts": ("0", "1", "2", "3", "4", "5")}
