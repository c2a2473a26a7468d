"""Step clock, memory, energy and model summary."""

import math
import time

import pytest
import torch

from gradscope.monitor.resources import EnergyMeter, StepClock, as_scalar, model_summary, peak_memory


def test_cpu_clock_records_values_time_and_memory():
    clock = StepClock(torch.device("cpu"))
    time.sleep(0.01)
    clock.tick(0, {"loss": torch.tensor(2.5), "lr": 0.1})
    clock.tick(1, {})
    first, second = clock.completed()
    assert first.step == 0 and first.values == {"loss": 2.5, "lr": 0.1}
    assert first.step_time >= 0.01
    assert second.values == {} and second.step_time >= 0
    assert first.peak_memory > 1e6
    assert math.isnan(first.energy)  # no NVML on CPU
    assert clock.completed() == []


def test_scalars_are_checked():
    assert as_scalar(3, "loss") == 3.0
    cpu = as_scalar(torch.full((1, 1), 2.5, requires_grad=True) * 2, "loss")  # a CPU tensor is read at once
    assert type(cpu) is float and cpu == 5.0
    device = as_scalar(torch.ones(1, 1, device="meta"), "loss")  # a device tensor stays one, without a sync
    assert isinstance(device, torch.Tensor) and device.shape == () and not device.requires_grad
    with pytest.raises(ValueError, match="loss must be a scalar"):
        as_scalar(torch.ones(2), "loss")
    with pytest.raises(TypeError, match="acc must be a number"):
        as_scalar("high", "acc")


def test_model_summary_counts_tied_parameters_once():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[1].weight = model[0].weight
    model[1].bias.requires_grad_(False)
    summary = model_summary(model, rows=2)
    assert summary == {"parameters": 24, "trainable": 20, "bytes": 96, "layers": 2}


def test_energy_meter_is_unavailable_without_a_gpu():
    meter = EnergyMeter(torch.device("cpu"))
    assert not meter.available and math.isnan(meter.joules())
    assert peak_memory(torch.device("cpu")) > 0


class SlowCounter:
    """An energy counter that takes ``delay`` seconds per read, like NVML on some machines,
    and returns 10 J more at every read."""

    def __init__(self, delay: float) -> None:
        self.delay, self.reads, self.threads = delay, 0, set()

    def __call__(self) -> float:
        import threading

        time.sleep(self.delay)
        self.threads.add(threading.get_ident())
        self.reads += 1
        return 10.0 * self.reads


def test_energy_readings_are_taken_off_the_calling_thread(monkeypatch):
    import threading

    from gradscope.monitor import resources

    monkeypatch.setattr(resources, "ENERGY_WORKER_IDLE_S", 0.2)
    counter = SlowCounter(delay=0.05)
    meter = EnergyMeter(torch.device("cpu"), counter=counter)
    assert meter.available
    started = time.perf_counter()
    for key in range(4):
        meter.mark(key)
    assert time.perf_counter() - started < 0.05  # four 50 ms reads requested, none waited for
    readings = [meter.take(key, wait=True) for key in range(4)]
    assert readings == [10.0, 20.0, 30.0, 40.0]  # in request order
    assert threading.get_ident() not in counter.threads
    assert meter.take(0) is None  # taken once
    deadline = time.perf_counter() + 5
    while any(t.name == "gradscope-energy" for t in threading.enumerate()) and time.perf_counter() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "gradscope-energy" for t in threading.enumerate())  # idle worker ends
    meter.mark("again")  # and a new request starts one again
    assert meter.take("again", wait=True) == 50.0


def test_a_failing_counter_reads_as_nan_and_never_raises():
    def broken() -> float:
        raise RuntimeError("NVML went away")

    meter = EnergyMeter(torch.device("cpu"), counter=broken)
    meter.mark(0)
    assert math.isnan(meter.take(0, wait=True))
    assert math.isnan(meter.joules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_clock_energy_is_the_counter_difference_per_step_without_sync():
    counter = SlowCounter(delay=0.002)
    clock = StepClock(torch.device("cuda"), energy=EnergyMeter(torch.device("cuda"), counter=counter))
    x = torch.randn(1024, 1024, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(5):
            loss = (x @ x).square().mean()
            clock.tick(step, {"loss": loss})
    finally:
        torch.cuda.set_sync_debug_mode("default")
    records = clock.completed(block=True)
    assert [r.step for r in records] == list(range(5))
    assert [r.energy for r in records] == [10.0] * 5  # each step: one read, 10 J after the previous
    assert all(r.step_time > 0 and math.isfinite(r.values["loss"]) for r in records)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_memory_is_the_allocators_peak():
    device = torch.device("cuda")
    big = torch.empty(64 << 20, dtype=torch.uint8, device=device)
    assert peak_memory(device) == torch.cuda.max_memory_allocated(device) >= big.numel()


def test_a_counter_that_hangs_is_given_up_not_waited_for(monkeypatch):
    from gradscope.monitor import resources

    monkeypatch.setattr(resources, "ENERGY_WAIT_S", 0.2)
    release = __import__("threading").Event()

    def hanging() -> float:
        release.wait(5)
        return 1.0

    meter = EnergyMeter(torch.device("cpu"), counter=hanging)
    meter.mark(0)
    started = time.perf_counter()
    assert math.isnan(meter.take(0, wait=True))
    assert time.perf_counter() - started < 2
    assert not meter.available  # no more waiting on it: later steps read NaN at once
    meter.mark(1)
    assert meter.take(1) is None
    release.set()
