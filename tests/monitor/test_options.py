"""``WatchOptions`` (``gradscope.monitor.options``) and how ``gradscope.watch`` takes its options.

Defaults, each invalid value named in its error, immutability, normalisation (exporters to a
tuple, ``thresholds=None`` to the defaults), positional arguments in the documented order,
unknown keywords, ``watch``'s signature built from the fields, and ``mon.options``.
"""

import dataclasses
import inspect

import pytest
import torch

import gradscope
from gradscope.exporters import Exporter
from gradscope.monitor.options import OPTION_NAMES, WatchOptions

POSITIONAL = ("every", "mode", "accumulation_steps", "optimizer", "scaler", "track_updates", "history")
KEYWORD_ONLY = (
    "granularity",
    "params",
    "names",
    "backend",
    "hist_history",
    "history_mib",
    "histogram_every",
    "thresholds",
    "log_dir",
    "exporters",
    "log_rank",
    "check_consistency",
    "comm_hook",
    "batch_size",
    "noise_scale_decay",
    "forward",
    "on_finding",
    "halt_on",
    "early_stopping",
    "adapt_lr",
    "compression",
    "tags",
)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def test_defaults():
    options = WatchOptions()
    assert options.every == 1
    assert options.mode == "backward"
    assert options.accumulation_steps == 1
    assert options.optimizer is None
    assert options.scaler is None
    assert options.track_updates is False
    assert options.history == 10_000
    assert options.granularity == "layer"
    assert options.params is None
    assert options.names is None
    assert options.backend == "auto"
    assert options.hist_history == 1_000
    assert options.history_mib == 512
    assert options.histogram_every == 32
    assert options.thresholds == gradscope.Thresholds()
    assert options.log_dir is None
    assert options.exporters == ()
    assert options.log_rank == 0
    assert options.check_consistency is False
    assert options.comm_hook is True
    assert options.batch_size is None
    assert options.noise_scale_decay == 0.95
    assert options.tags == {}


def test_option_names_are_the_fields_in_order():
    assert OPTION_NAMES == POSITIONAL + KEYWORD_ONLY
    assert tuple(f.name for f in dataclasses.fields(WatchOptions)) == OPTION_NAMES


@pytest.mark.parametrize(
    "name", ["every", "accumulation_steps", "history", "hist_history", "history_mib", "batch_size"]
)
@pytest.mark.parametrize("value", [0, -3, True, False, 2.0, "4", None], ids=repr)
def test_counts_must_be_positive_integers(name, value):
    if name == "batch_size" and value is None:
        assert WatchOptions(batch_size=None).batch_size is None  # the one count that may be absent
        return
    with pytest.raises(ValueError) as raised:
        WatchOptions(**{name: value})
    assert str(raised.value) == f"watch: {name} must be a positive integer, got {value!r}"


@pytest.mark.parametrize(
    "name", ["every", "accumulation_steps", "history", "hist_history", "history_mib", "batch_size"]
)
def test_counts_accept_positive_integers(name):
    assert getattr(WatchOptions(**{name: 7}), name) == 7


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"mode": "forward"}, ValueError, r"watch: mode must be one of \('backward', 'step'\), got 'forward'"),
        ({"mode": None}, ValueError, "watch: mode must be one of"),
        ({"granularity": "neuron"}, ValueError, "watch: granularity must be 'layer' or 'parameter', got 'neuron'"),
        (
            {"backend": "cupy"},
            ValueError,
            r"watch: backend must be one of \('auto', 'triton', 'numba', 'numpy'\), got 'cupy'",
        ),
        ({"backend": "Triton"}, ValueError, "watch: backend must be"),
        ({"optimizer": "sgd"}, TypeError, "watch: optimizer must be a torch.optim.Optimizer, got str"),
        ({"optimizer": torch.nn.Linear(1, 1)}, TypeError, "watch: optimizer must be .*, got Linear"),
        ({"track_updates": True}, ValueError, r"watch: track_updates=True needs optimizer="),
        ({"scaler": object()}, TypeError, "watch: scaler must be a torch.amp.GradScaler, got object"),
        ({"thresholds": {"sustain": 3}}, TypeError, "watch: thresholds must be a gradscope.Thresholds, got dict"),
        ({"exporters": [object()]}, TypeError, "watch: exporters must be gradscope.exporters.Exporter .*got object"),
        ({"exporters": [Exporter(), "tb"]}, TypeError, "watch: exporters must be .*, got str"),
        ({"noise_scale_decay": 1.0}, ValueError, r"watch: noise_scale_decay must be in \[0, 1\), got 1.0"),
        ({"noise_scale_decay": -0.01}, ValueError, "watch: noise_scale_decay must be in"),
        ({"noise_scale_decay": float("nan")}, ValueError, "watch: noise_scale_decay must be in"),
        ({"noise_scale_decay": True}, ValueError, "watch: noise_scale_decay must be in"),
        ({"noise_scale_decay": "0.5"}, ValueError, "watch: noise_scale_decay must be in"),
        ({"log_rank": 1}, ValueError, r"watch: log_rank must be None or a rank in \[0, 1\), got 1"),
        ({"log_rank": -1}, ValueError, "watch: log_rank must be None or a rank"),
        ({"log_rank": True}, ValueError, "watch: log_rank must be None or a rank"),
        ({"log_rank": 0.0}, ValueError, "watch: log_rank must be None or a rank"),
        ({"tags": ["fold", 2]}, TypeError, "watch: tags must be a dict of names to values, got list"),
        (
            {"tags": {"fold": 2, "layers": [1, 2]}},
            TypeError,
            r"watch: tags\['layers'\] must be a JSON scalar.*got list",
        ),
        ({"tags": {"lr": float("nan")}}, TypeError, r"watch: tags\['lr'\] must be a JSON scalar"),
        ({"tags": {"fold": torch.tensor(2)}}, TypeError, r"watch: tags\['fold'\] must be a JSON scalar.*got Tensor"),
        ({"tags": {3: "x"}}, TypeError, "watch: tags: every key must be a non-empty string, got 3"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_invalid_values_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        WatchOptions(**kwargs)


def test_valid_edge_values_are_accepted():
    optimizer = torch.optim.SGD(tiny_model().parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    options = WatchOptions(
        mode="step",
        granularity="parameter",
        backend="numpy",
        optimizer=optimizer,
        track_updates=True,
        scaler=scaler,
        noise_scale_decay=0,
        log_rank=None,
    )
    assert options.optimizer is optimizer and options.scaler is scaler
    assert options.noise_scale_decay == 0 and options.log_rank is None


def test_frozen():
    options = WatchOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.every = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.exporters = []
    assert options.every == 1


def test_exporters_are_normalised_to_a_tuple():
    first, second = Exporter(), Exporter()
    from_list = WatchOptions(exporters=[first, second])
    assert type(from_list.exporters) is tuple
    assert from_list.exporters == (first, second)
    from_generator = WatchOptions(exporters=(e for e in [second]))
    assert from_generator.exporters == (second,)


def test_thresholds_none_means_the_defaults_and_given_ones_are_kept():
    assert WatchOptions(thresholds=None).thresholds == gradscope.Thresholds()
    mine = gradscope.Thresholds(sustain=2)
    assert WatchOptions(thresholds=mine).thresholds is mine


def test_positional_options_through_watch_in_the_documented_order():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, 2, "step", 3, optimizer, None, True, 50) as mon:
        options = mon.options
        assert (options.every, options.mode, options.accumulation_steps) == (2, "step", 3)
        assert options.optimizer is optimizer
        assert options.scaler is None
        assert options.track_updates is True
        assert options.history == 50
        assert (mon.every, mon.mode, mon.accumulation_steps) == (2, "step", 3)


def test_an_eighth_positional_option_is_a_type_error():
    model = tiny_model()
    with pytest.raises(TypeError, match=r"watch\(\) takes from 1 to 8 positional arguments but 9 were given"):
        gradscope.watch(model, 1, "backward", 1, None, None, False, 10, "layer")
    with gradscope.watch(model) as mon:  # the failed call did not leave the model watched
        assert mon.options == WatchOptions()


def test_unknown_keyword_names_watch_and_the_keyword():
    with pytest.raises(TypeError, match=r"watch\(\) got an unexpected keyword argument 'evry'") as raised:
        gradscope.watch(tiny_model(), evry=2)
    assert "WatchOptions" not in str(raised.value)


def test_an_option_given_twice_names_watch():
    with pytest.raises(TypeError, match=r"watch\(\) got multiple values for argument 'every'"):
        gradscope.watch(tiny_model(), 2, every=3)


def test_watch_passes_validation_errors_through_unchanged():
    with pytest.raises(TypeError) as raised:
        gradscope.watch(tiny_model(), optimizer="adam")
    assert str(raised.value) == "watch: optimizer must be a torch.optim.Optimizer, got str"
    with pytest.raises(ValueError, match=r"^watch: hist_history must be a positive integer, got 0$"):
        gradscope.watch(tiny_model(), hist_history=0)


def test_watch_signature_is_model_then_every_option_with_its_default():
    parameters = list(inspect.signature(gradscope.watch).parameters.values())
    assert [p.name for p in parameters] == ["model", *OPTION_NAMES]
    model, *options = parameters
    assert model.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert model.default is inspect.Parameter.empty
    kinds = {p.name: p.kind for p in options}
    assert all(kinds[name] is inspect.Parameter.POSITIONAL_OR_KEYWORD for name in POSITIONAL)
    assert all(kinds[name] is inspect.Parameter.KEYWORD_ONLY for name in KEYWORD_ONLY)
    defaults = {f.name: f.default for f in dataclasses.fields(WatchOptions)}
    assert {p.name: p.default for p in options} == defaults
    assert defaults["history"] == 10_000 and defaults["exporters"] == () and defaults["backend"] == "auto"


def test_mon_options_is_the_watch_options_used():
    model = tiny_model()
    exporter = Exporter()
    with gradscope.watch(model, every=4, backend="numpy", granularity="parameter", exporters=[exporter]) as mon:
        assert isinstance(mon.options, WatchOptions)
        assert mon.options == WatchOptions(every=4, backend="numpy", granularity="parameter", exporters=(exporter,))
        assert mon.options.exporters == (exporter,)
        assert mon.thresholds is mon.options.thresholds
        assert mon.rows == ("0.weight", "0.bias", "2.weight", "2.bias")


def test_names_takes_a_model_a_mapping_or_a_function():
    model = tiny_model()
    for names in (model, {"0.weight": "a.weight"}, str.upper, None):
        assert WatchOptions(names=names).names is names
    with pytest.raises(TypeError, match="names= takes the model"):
        WatchOptions(names=["a"])
    with pytest.raises(ValueError, match="names= and forward=True together are not supported yet"):
        WatchOptions(names=model, forward=True)


def test_a_pipeline_stage_is_measured_in_step_mode_and_refuses_what_it_cannot_do():
    assert WatchOptions().for_pipeline_stage(mode_given=False).mode == "step"
    assert WatchOptions(mode="step").for_pipeline_stage(mode_given=True).mode == "step"
    with pytest.raises(ValueError, match=r"measured in mode='step'.*leave mode out"):
        WatchOptions(mode="backward").for_pipeline_stage(mode_given=True)
    with pytest.raises(ValueError, match="accumulation_steps does not apply to a pipeline stage"):
        WatchOptions(accumulation_steps=2).for_pipeline_stage(mode_given=False)
    with pytest.raises(ValueError, match="halt_on, early_stopping and adapt_lr are not supported with pipeline stages"):
        WatchOptions(halt_on="nonfinite").for_pipeline_stage(mode_given=False)
    with pytest.raises(ValueError, match="forward=True is not supported with pipeline stages"):
        WatchOptions(forward=True).for_pipeline_stage(mode_given=False)


def test_a_pipeline_stage_logs_into_its_stage_folder(tmp_path):
    from gradscope.distributed.pipeline import PipelinePlace
    from gradscope.distributed.topology import Topology

    topology = Topology("single", None, 3, 4, global_rank=3)
    stage = PipelinePlace(stage=1, stages=2, ranks=(2, 3), logs=True)
    (log,) = WatchOptions(log_dir=tmp_path).destinations(topology, stage)
    assert log.directory == tmp_path / "stage-00001"
    every_rank = dataclasses.replace(stage, every_rank_logs=True)
    (log,) = WatchOptions(log_dir=tmp_path, log_rank=None).destinations(topology, every_rank)
    assert log.directory == tmp_path / "rank-00003"


def test_tags_reach_the_run_log_header(tmp_path):
    model = tiny_model()
    tags = {"fold": 2, "lr": 3e-4, "name": "a", "final": True, "note": None}
    with gradscope.watch(model, log_dir=tmp_path / "run", tags=tags) as mon:
        model(torch.randn(2, 3)).sum().backward()
        mon.step()
        assert mon.tags == tags
    assert gradscope.load_run(tmp_path / "run").tags == tags
