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


def test_names_as_in_the_model_the_parameters_belong_to():
    """A stage cut from a model (nn.Sequential renumbers from 0) reports the model's names:
    found by identity in the model, or given as a mapping or function; params= selects by them."""
    full = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    stage = torch.nn.Sequential(*list(full)[2:])
    assert select(stage).row_names == ("0", "1")
    by_model = select(stage, names=full)
    assert by_model.names == ("2.weight", "2.bias", "3.weight", "3.bias")
    assert by_model.row_names == ("2", "3") and by_model.row_types == ("Linear", "LayerNorm")
    assert by_model.params == tuple(stage.parameters())
    mapping = {f"{i}.{kind}": f"blocks.{i + 2}.{kind}" for i in (0, 1) for kind in ("weight", "bias")}
    assert select(stage, names=mapping).row_names == ("blocks.2", "blocks.3")
    assert select(stage, names=lambda name: "top." + name).row_names == ("top.0", "top.1")
    assert select(stage, params="3.*", names=full).names == ("3.weight", "3.bias")
    assert select(stage, granularity="parameter", names=full).row_names == by_model.names


def test_names_that_miss_a_parameter_or_repeat_a_name_are_refused():
    stage = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"names= has no name for parameters 1\.weight, 1\.bias"):
        select(stage, names=torch.nn.Sequential(stage[0]))
    with pytest.raises(ValueError, match="names= gives several parameters the same name: w"):
        select(stage, names=lambda name: "w")
    with pytest.raises(TypeError, match="names must be non-empty strings"):
        select(stage, names=lambda name: None)
    with pytest.raises(TypeError, match="names= takes the model"):
        select(stage, names=3)


def test_untracked_parameters_are_named_as_names_names_them():
    full = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    stage = torch.nn.Sequential(full[1])
    watched = select(stage, names=full)
    full[1].bias = torch.nn.Parameter(torch.zeros(2))
    assert untracked(stage, watched) == ["1.bias"]
    stage.add_module("extra", torch.nn.Linear(2, 2))  # not in the model given as names=: its own name
    assert untracked(stage, watched) == ["1.bias", "extra.weight", "extra.bias"]
