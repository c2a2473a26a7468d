"""The benchmark script runs end to end and writes the JSON it promises (no timings checked)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench_stats(monkeypatch):
    yield load("bench_stats", monkeypatch)
    sys.modules.pop("model_shapes", None)


@pytest.fixture
def bench_overhead(monkeypatch):
    yield load("bench_overhead", monkeypatch)
    for name in ("model_shapes", "bench_stats"):
        sys.modules.pop(name, None)


def test_writes_results_with_environment(bench_stats, tmp_path, capsys):
    out = tmp_path / "result.json"
    assert bench_stats.main(["--sets", "tiny", "--device", "cpu", "--repeats", "2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    env = data["environment"]
    for key in ("date", "commit", "device", "torch", "numpy", "python", "cpu_threads"):
        assert env[key] not in (None, ""), key
    (entry,) = data["sets"]
    assert entry["numel"] == 64 * 32 + 32
    methods = {r["method"] for r in entry["results"]}
    assert {"read floor (torch.sum, one buffer)", "gradscope (grad_stats)", "torch per-tensor, full set"} <= methods
    floor = entry["results"][0]
    assert floor["x_floor"] == 1.0
    assert all(r["median_ms"] > 0 for r in entry["results"])
    assert "gradscope (grad_stats)" in capsys.readouterr().out


def test_model_shapes_have_their_advertised_sizes(bench_stats):
    import model_shapes

    assert sum(p.numel() for p in model_shapes.builtin_mlp().parameters()) == pytest.approx(25.7e6, rel=0.002)
    assert sum(math.prod(s) for _, s in model_shapes.gpt2_shapes()) == 124_439_808
    assert sum(math.prod(s) for _, s in model_shapes.llama_1b_shapes()) == pytest.approx(1.236e9, rel=0.001)


def test_overhead_benchmark_runs_every_method(bench_overhead, tmp_path):
    out = tmp_path / "overhead.json"
    assert (
        bench_overhead.main(["--models", "tiny", "--device", "cpu", "--rounds", "1", "--steps", "1", "--out", str(out)])
        == 0
    )
    (entry,) = json.loads(out.read_text())["models"]
    methods = [r["method"] for r in entry["results"]]
    assert methods[:3] == ["no monitoring", "gradscope watch(every=1)", "gradscope watch(every=10)"]
    assert {"per-parameter .norm().item()", "set_detect_anomaly(True)"} <= set(methods)
    assert entry["results"][0]["x_plain"] == 1.0
