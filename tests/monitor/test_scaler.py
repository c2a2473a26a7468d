"""What gradscope knows about ``torch.amp.GradScaler`` (``gradscope.monitor.scaler``).

With a real CPU GradScaler and SGD on a tiny model: the scale read on the device, the
unscaling factor per engine (a Python float for NumPy, a float32 tensor for the kernels),
equal to what ``scaler.unscale_`` multiplies by, and the "already unscaled" state in step
mode, reset by ``scaler.update()``.
"""

import numpy as np
import torch

from gradscope.monitor.scaler import already_unscaled, inv_scale_for, scale_tensor

CPU = torch.device("cpu")


def scaled_backward(init_scale: float = 2.0**10):
    """A tiny model after ``scaler.scale(loss).backward()``: (model, optimizer, scaler)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    loss = model(torch.randn(5, 4)).square().mean()
    scaler.scale(loss).backward()
    return model, optimizer, scaler


def test_scale_tensor_is_the_scale_as_a_0d_tensor():
    _, _, scaler = scaled_backward()
    scale = scale_tensor(scaler)
    assert isinstance(scale, torch.Tensor)
    assert scale.dim() == 0
    assert scale.dtype == torch.float32
    assert scale.device == CPU
    assert float(scale) == scaler.get_scale() == 1024.0
    assert not scale.requires_grad


def test_scale_tensor_is_none_without_an_enabled_scaler():
    assert scale_tensor(None) is None
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    assert not disabled.is_enabled()
    assert scale_tensor(disabled) is None


def test_inv_scale_for_numpy_is_a_python_float():
    _, optimizer, scaler = scaled_backward()
    for mode in ("backward", "step"):
        inverse = inv_scale_for(scaler, optimizer, mode, "numpy")
        assert type(inverse) is float
        assert inverse == 2.0**-10


def test_inv_scale_for_a_device_is_a_one_element_float32_tensor_there():
    _, optimizer, scaler = scaled_backward()
    inverse = inv_scale_for(scaler, optimizer, "backward", CPU)
    assert isinstance(inverse, torch.Tensor)
    assert inverse.dtype == torch.float32
    assert inverse.shape == (1,)
    assert inverse.device == CPU
    assert inverse.item() == 2.0**-10
    elsewhere = inv_scale_for(scaler, optimizer, "backward", torch.device("meta"))
    assert elsewhere.device.type == "meta" and elsewhere.shape == (1,) and elsewhere.dtype == torch.float32


def test_inv_scale_is_none_without_an_enabled_scaler():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert inv_scale_for(None, optimizer, "backward", "numpy") is None
    assert inv_scale_for(torch.amp.GradScaler("cpu", enabled=False), optimizer, "step", CPU) is None


def test_inv_scale_is_what_unscale_multiplies_by():
    """A scale of 3: its float32 inverse is rounded, and must be rounded as GradScaler rounds it."""
    model, optimizer, scaler = scaled_backward(init_scale=3.0)
    inverse = inv_scale_for(scaler, optimizer, "backward", CPU)
    assert inverse.item() == float(np.float32(1 / 3))
    assert inv_scale_for(scaler, optimizer, "backward", "numpy") == inverse.item()
    scaled = [p.grad.clone() for p in model.parameters()]
    scaler.unscale_(optimizer)
    for before, param in zip(scaled, model.parameters(), strict=True):
        torch.testing.assert_close(param.grad, before * inverse, rtol=0, atol=0)


def test_step_mode_after_unscale_measures_gradients_as_they_are():
    _, optimizer, scaler = scaled_backward()
    assert already_unscaled(scaler, optimizer) is False
    assert inv_scale_for(scaler, optimizer, "step", "numpy") == 2.0**-10
    scaler.unscale_(optimizer)
    assert already_unscaled(scaler, optimizer) is True
    assert inv_scale_for(scaler, optimizer, "step", "numpy") is None
    assert inv_scale_for(scaler, optimizer, "step", CPU) is None
    # backward mode measured the gradients during backward, before unscale_ could run
    assert inv_scale_for(scaler, optimizer, "backward", "numpy") == 2.0**-10
    # without the optimizer, whether it was unscaled cannot be known: the scale applies
    assert inv_scale_for(scaler, None, "step", "numpy") == 2.0**-10


def test_unscaled_only_for_the_optimizer_that_was_unscaled():
    model, optimizer, scaler = scaled_backward()
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.unscale_(optimizer)
    assert already_unscaled(scaler, other) is False
    assert inv_scale_for(scaler, other, "step", "numpy") == 2.0**-10


def test_update_starts_a_new_step_that_is_scaled_again():
    _, optimizer, scaler = scaled_backward()
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    assert already_unscaled(scaler, optimizer) is False
    assert scaler.get_scale() == 1024.0  # no overflow: the scale stays (growth is every 2000 steps)
    assert inv_scale_for(scaler, optimizer, "step", "numpy") == 2.0**-10


def test_an_overflow_step_lowers_the_scale_read_on_the_device():
    model, optimizer, scaler = scaled_backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(optimizer)  # skipped: the gradient is not finite
    scaler.update()
    assert scaler.get_scale() == 512.0
    assert float(scale_tensor(scaler)) == 512.0
    assert inv_scale_for(scaler, optimizer, "backward", "numpy") == 2.0**-9


def test_already_unscaled_is_false_for_a_scaler_that_never_ran():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert already_unscaled(torch.amp.GradScaler("cpu"), optimizer) is False
