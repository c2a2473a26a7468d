"""Choosing watched parameters and grouping them into rows."""

import pytest
import torch

from gradscope.monitor.watched import ROOT_LAYER, layer_name, select, untracked


def test_layer_names_are_the_owning_modules():
    assert layer_name("encoder.layers.0.linear1.weight") == "encoder.layers.0.linear1"
    assert layer_name("weight") == ROOT_LAYER


def test_rows_group_parameters_by_module_in_order():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3))
    watched = select(model)
    assert watched.names == ("0.weight", "0.bias", "1.weight", "1.bias")
    assert watched.row_names == ("0", "1")
    assert watched.row_types == ("Linear", "LayerNorm")
    assert watched.row_of.tolist() == [0, 0, 1, 1]
    assert watched.numel.tolist() == [6, 3, 3, 3]


def test_compiled_wrapper_prefix_is_removed():
    model = torch.nn.Linear(2, 2)
    compiled = torch.compile(model)
    assert select(compiled).names == ("weight", "bias")
    assert select(compiled).params[0] is model.weight


def test_selection_by_pattern_name_and_predicate():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    assert select(model, params="1.*").names == ("1.weight", "1.bias")
    assert select(model, params=["0.bias", "1.weight"]).names == ("0.bias", "1.weight")
    assert select(model, params=lambda name, p: p.dim() == 1).names == ("0.bias", "1.bias")
    with pytest.raises(ValueError, match="no parameters selected"):
        select(model, params="2.*")
    with pytest.raises(TypeError, match="params="):
        select(model, params=[1, 2])


def test_untracked_reports_added_and_replaced_parameters_within_the_selection():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    watched = select(model, params="0.*")
    model.append(torch.nn.Linear(2, 2))
    model[0].bias = torch.nn.Parameter(torch.zeros(2))
    assert untracked(model, watched) == ["0.bias"]
