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
    for name in ("model_shapes", "bench_stats", "integration_methods"):
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
    # light rows (histogram=False) next to full ones, per CPU kernel and through grad_stats
    assert {"gradscope light (histogram=False)", "gradscope numpy light", "gradscope numpy light, 1 thread"} <= methods
    floor = entry["results"][0]
    assert floor["x_floor"] == 1.0
    assert all(r["median_ms"] > 0 for r in entry["results"])
    assert entry["light_matches_full_bitwise"] is True
    cost = entry["amortised"]["gradscope (grad_stats)"]
    median = {r["method"]: r["median_ms"] for r in entry["results"]}
    full, light = median["gradscope (grad_stats)"], median["gradscope light (histogram=False)"]
    assert cost["histogram_every"] == 32 and cost["ms"] == pytest.approx((full + 31 * light) / 32)
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
    assert methods[:4] == [
        "no monitoring",
        "gradscope watch(every=1)",
        "gradscope watch(every=1, histogram_every=1)",
        "gradscope watch(every=10)",
    ]
    assert {"per-parameter .norm().item()", "set_detect_anomaly(True)"} <= set(methods)
    assert entry["results"][0]["x_plain"] == 1.0
    assert "lightning" not in entry  # only with --integrations


def test_step_cost_benchmark_times_sampled_and_unsampled_calls(monkeypatch, tmp_path):
    bench = load("bench_step_cost", monkeypatch)
    out = tmp_path / "step-cost.json"
    try:
        assert bench.main(["--model", "tiny", "--steps", "12", "--rounds", "1", "--out", str(out)]) == 0
    finally:
        for name in ("model_shapes", "bench_stats", "bench_overhead", "integration_methods"):
            sys.modules.pop(name, None)
    rows = json.loads(out.read_text())["rows"]
    assert [row["every"] for row in rows] == list(bench.EVERY)
    assert "unsampled" not in rows[0] and rows[0]["sampled"]["median_us"] > 0  # every=1: all sampled
    assert all(row["unsampled"]["median_us"] > 0 for row in rows[1:])
    assert all(row["mean_per_step_us"] > 0 for row in rows)


def test_threads_benchmark_compares_one_thread_with_the_default(monkeypatch, tmp_path):
    import torch

    bench = load("bench_threads", monkeypatch)
    out = tmp_path / "threads.json"
    threads = torch.get_num_threads()
    try:
        argv = ["--models", "tiny", "--threads", "1,2", "--rounds", "2", "--steps", "2", "--out", str(out)]
        assert bench.main(argv) == 0
    finally:
        sys.modules.pop("bench_stats", None)
    assert torch.get_num_threads() == threads  # the caller's setting is restored
    data = json.loads(out.read_text())
    assert len(data["environment"]["load_average_before"]) == 3 and data["rounds"] == 2
    entries = data["models"]
    assert [(e["model"], e["threads"]) for e in entries] == [("tiny", 1), ("tiny", 2)]
    for entry in entries:
        assert entry["tensors"] == 4 and entry["capture"]
        assert len(entry["ratio"]["rounds"]) == 2
        assert entry["ratio"]["min"] <= entry["ratio"]["median"] <= entry["ratio"]["max"]
        assert entry["gradscope_training_thread_ms"]["median"] > 0


def test_overhead_benchmark_measures_the_integrations(bench_overhead, tmp_path):
    pytest.importorskip("wandb", reason="needs the wandb extra")
    pytest.importorskip("lightning", reason="needs the lightning extra")
    out = tmp_path / "overhead.json"
    argv = ["--models", "tiny", "--device", "cpu", "--rounds", "1", "--steps", "2", "--out", str(out)]
    assert bench_overhead.main([*argv, "--methods", "wandb,Wandb", "--integrations"]) == 0
    (entry,) = json.loads(out.read_text())["models"]
    methods = [r["method"] for r in entry["results"]]
    assert methods == [
        "no monitoring",
        "wandb.watch(log='gradients')",
        "gradscope watch(every=1) + WandbExporter",
        "gradscope watch(every=10) + WandbExporter",
    ]
    fits = {row["method"]: row for row in entry["lightning"]}
    assert list(fits) == [
        "Lightning fit, no callback",
        "GradscopeCallback(every=1)",
        "GradscopeCallback(every=10)",
        "grad_norm callback (what users write)",
    ]
    assert fits["Lightning fit, no callback"]["x_plain"] == 1.0
    assert all(row["steps"] == 2 and row["median_ms"] > 0 for row in fits.values())


@pytest.fixture
def gpu_check(monkeypatch):
    yield load("gpu_check", monkeypatch)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_refuses_without_a_gpu_and_dry_run_lists_every_step(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["--out-dir", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written
    assert gpu_check.main(["--dry-run", "--out-dir", str(tmp_path)]) == 0
    listed = capsys.readouterr().out
    for step, script in [("tests", "pytest"), ("stats", "bench_stats.py"), ("launch", "bench_launch.py")]:
        assert f"{step} (limit" in listed and script in listed
    assert "overhead (limit" in listed and "--device cuda" in listed
    assert "--rounds 5 --steps 30" in listed  # the floor: 5 interleaved rounds x 30 steps
    limits = [int(line.split("(limit ")[1].split(" s)")[0]) for line in listed.splitlines() if "(limit" in line]
    assert sum(limits) <= 8 * 60  # the whole check fits in 8 minutes
    assert gpu_check.main(["--dry-run", "--quick", "--only", "stats"]) == 0
    quick = capsys.readouterr().out
    assert quick.count("(limit") == 1 and "--repeats" in quick


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_launch_benchmark_refuses_without_a_gpu(monkeypatch, capsys):
    bench_launch = load("bench_launch", monkeypatch)
    try:
        assert bench_launch.main([]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err
    finally:
        for name in ("model_shapes", "bench_stats"):
            sys.modules.pop(name, None)


def test_kernel_static_report_writes_the_promised_json(monkeypatch, tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    static = load("kernel_static", monkeypatch)
    try:
        static.cuobjdump()
    except SystemExit:
        pytest.skip("Triton ships no cuobjdump here")
    out = tmp_path / "static.json"
    chosen = static.variants([90])
    # 3 kernels (light, full, gated) x 4 dtypes x scale x alignment: what the launcher launches
    assert len(chosen) == 48 and {v["kernel"] for v in chosen} == {"light", "histogram", "gated"}
    # One variant of two kernels is enough for the script's plumbing (tests/kernels compiles all).
    monkeypatch.setattr(
        static,
        "variants",
        lambda arches, kernels: [v for v in chosen if v["dtype"] == "bfloat16" and v["scale"] and v["aligned"]][:2],
    )
    assert static.main(["--json", str(out), "--jobs", "1"]) == 0
    report = json.loads(out.read_text())
    assert [(r["kernel"], r["dtype"], r["scale"], r["aligned"]) for r in report] == [
        ("light", "bfloat16", True, True),
        ("histogram", "bfloat16", True, True),
    ]
    for entry in report:
        assert isinstance(entry["registers"], int) and entry["registers"] > 0
        assert entry["spills"] == 0 and entry["loop_shuffles"] == 0
        assert entry["instructions_per_element"] > 0 and entry["triton"] and entry["arch"] == 90
    light, full = report
    assert light["loop_barriers"] == 0 and full["loop_barriers"] >= 1  # the histogram's shared memory
    assert light["instructions_per_element"] < full["instructions_per_element"]


@pytest.fixture
def bench_actions(monkeypatch):
    yield load("bench_actions", monkeypatch)
    sys.modules.pop("bench_stats", None)  # imported from benchmarks/ by the script: not kept


def test_the_controller_benchmark_compares_both_arms(bench_actions, tmp_path, capsys):
    import torch

    out = tmp_path / "actions.json"
    assert bench_actions.main(["--seeds", "2", "--steps", "40", "--peaks", "1e-3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["environment"]["torch"] == torch.__version__
    off, on = result["results"]
    assert (off["controller"], on["controller"]) == (False, True)
    assert [r["seed"] for r in on["runs"]] == [0, 1]
    # At the demo's healthy rate the controller changes nothing: the two arms train alike.
    assert [r["final_loss"] for r in off["runs"]] == [r["final_loss"] for r in on["runs"]]
    assert on["lr_changes"] == 0
    assert "lr changes" in capsys.readouterr().out


@pytest.fixture
def bench_memory(monkeypatch):
    yield load("bench_memory", monkeypatch)
    sys.modules.pop("bench_stats", None)  # imported from benchmarks/ by the script: not kept


def test_the_memory_benchmark_measures_watch_and_load_run(bench_memory, tmp_path, capsys):
    out = tmp_path / "memory.json"
    assert bench_memory.main(["--rows", "40", "--steps", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["rows"], result["steps"]) == (40, 3) and result["environment"]["commit"]
    (after,) = result["results"].values()
    watch, load = after["watch"], after["load_run"]
    assert watch["sampled_steps_kept"] == load["sampled_steps_kept"] == 3
    assert watch["history_bytes"] == load["history_bytes"] > 0 and watch["log_bytes"] > 0
    assert load["traced_peak_bytes"] >= load["history_bytes"]  # the loaded history is in what was traced
    assert "traced peak" in capsys.readouterr().out


@pytest.fixture
def bench_compression(monkeypatch):
    yield load("bench_compression", monkeypatch)
    sys.modules.pop("bench_stats", None)  # imported from benchmarks/ by the script: not kept


def test_the_compression_benchmark_prunes_and_quantizes_each_model(bench_compression, tmp_path, capsys):
    out = tmp_path / "compression.json"
    argv = ["--seeds", "1", "--steps", "20", "--models", "demo-mlp-outliers", "gpt2-tiny", "--out", str(out)]
    assert bench_compression.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["environment"]["commit"] and set(result["models"]) == {"demo-mlp-outliers", "gpt2-tiny"}
    for runs in result["models"].values():
        (run,) = runs
        assert set(run["pruning"]) == {"remove", "sparsify 50%"}
        for row in run["pruning"].values():
            assert set(row) == {"ranking", "fisher", "magnitude", "random"}
        # every candidate layer was quantized once per format, in one of the two groups
        counted = {short: sum(map(len, groups.values())) for short, groups in run["quantization"].items()}
        assert counted["int8"] == counted["fp8_e4m3"] == len(run["verdicts"])
    mlp = result["models"]["demo-mlp-outliers"][0]
    assert len(mlp["chosen"]["ranking"]) == 2 and mlp["base_loss"] > 0
    assert "ranking best in" in capsys.readouterr().out
