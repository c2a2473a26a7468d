"""GradscopeCallback inside real ``Trainer.fit`` runs (lightning.pytorch and pytorch_lightning).

Every number is compared with a float64 reference the LightningModule records itself
(:mod:`lightning_models`): the unscaled gradient before clipping, at each optimizer step.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("lightning", reason="needs the lightning extra")

import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning_models import (
    loader,
    logged_at,
    make_trainer,
    module_class,
    read_csv_rows,
    reference,
    scaler_plugin,
    step_losses,
)

import gradscope
from gradscope.integrations.lightning import GradscopeCallback

torch.set_num_threads(1)

TRAIN, BATCH, VAL = 28, 4, 16  # 7 training batches per epoch: accumulating 3 leaves a last window of 1
CLIP = 0.05


def _fit(pl, callback_class, root, *, accumulate=1, clip=None, **module_options):
    """Two epochs under a CPU GradScaler (scale 1024), ``accumulate`` batches per optimizer step."""
    module = module_class(pl)(**module_options)
    callback = callback_class()
    trainer = make_trainer(
        pl,
        root,
        [callback],
        max_epochs=2,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=clip,
        plugins=[scaler_plugin(pl)],
    )
    trainer.fit(module, loader(TRAIN, BATCH), loader(VAL, 8, seed=1))
    return SimpleNamespace(module=module, callback=callback, trainer=trainer, monitor=callback.monitor)


def _namespace(name: str):
    if name == "lightning":
        return L, GradscopeCallback
    pl = pytest.importorskip("pytorch_lightning")
    from gradscope.integrations.pytorch_lightning import GradscopeCallback as PlCallback

    return pl, PlCallback


# ---- 1, 4, 7, 9: one run per (namespace, accumulation), shared by the tests below ----------


@pytest.fixture(scope="module")
def clipped_runs(tmp_path_factory):
    """Fits on demand, once each: ``clipped_runs(namespace, accumulate)``."""
    cache = {}

    def get(name: str, accumulate: int) -> SimpleNamespace:
        if (name, accumulate) not in cache:
            pl, callback_class = _namespace(name)
            root = tmp_path_factory.mktemp(f"{name}-acc{accumulate}")
            run = _fit(pl, callback_class, root, accumulate=accumulate, clip=CLIP)
            run.name, run.accumulate = name, accumulate
            cache[name, accumulate] = run
        return cache[name, accumulate]

    return get


@pytest.fixture(
    scope="module",
    params=[("lightning", 1), ("lightning", 3), ("pytorch_lightning", 3)],
    ids=["lightning-acc1", "lightning-acc3", "pytorch_lightning-acc3"],
)
def clipped_run(request, clipped_runs):
    return clipped_runs(*request.param)


def test_one_sampled_step_per_optimizer_step(clipped_run):
    trainer, mon, module = clipped_run.trainer, clipped_run.monitor, clipped_run.module
    windows = math.ceil(TRAIN / BATCH / clipped_run.accumulate)
    assert trainer.global_step == 2 * windows  # 2 epochs, each with a shorter last window when accumulating
    assert mon.step_index == trainer.global_step
    assert len(module.grads) == trainer.global_step
    assert module.hook_steps == list(range(trainer.global_step))
    np.testing.assert_array_equal(mon.history("norm").steps, np.arange(trainer.global_step))


def test_numbers_are_the_unscaled_gradient_before_clipping(clipped_run):
    mon, module = clipped_run.monitor, clipped_run.module
    assert mon.rows == ("net.0", "net.2")
    for stat in ("norm", "max_abs", "zeros"):
        np.testing.assert_allclose(
            mon.history(stat).values, reference(module.grads, mon.rows, stat), rtol=1e-6, err_msg=stat
        )
    assert reference(module.grads, mon.rows, "zeros")[:, 0].min() >= 16  # the dead input's column, at least
    # Clipping really happened: the optimizer saw gradients of norm CLIP, gradscope the larger ones.
    total = np.sqrt((mon.history("sumsq").values).sum(axis=1))
    assert len(module.clipped_norms) == len(total)
    assert total.min() > 3 * CLIP
    np.testing.assert_allclose(module.clipped_norms, CLIP, rtol=1e-4)
    # The scaler was live (the hook already saw unscaled gradients: Lightning unscales first).
    np.testing.assert_array_equal(mon.history("grad_scale").values, 1024.0)


def test_loss_is_the_mean_of_the_steps_micro_batch_losses(clipped_run):
    mon, module, trainer = clipped_run.monitor, clipped_run.module, clipped_run.trainer
    loss = mon.history("loss")
    np.testing.assert_array_equal(loss.steps, np.arange(trainer.global_step))
    np.testing.assert_allclose(loss.values, step_losses(module.losses, trainer.global_step), rtol=1e-6)


def test_val_loss_reaches_the_monitor_but_train_loss_does_not(clipped_run):
    mon, module = clipped_run.monitor, clipped_run.module
    val = mon.history("val_loss")
    logged = ~np.isnan(val.values)
    expected = [np.mean(v) for v in module.val_losses]
    assert len(expected) == 2  # one validation per epoch
    np.testing.assert_allclose(val.values[logged], expected, rtol=1e-6)
    windows = mon.step_index // 2
    np.testing.assert_array_equal(val.steps[logged], [windows - 1, 2 * windows - 1])  # each epoch's last step
    assert not [f for f in mon.fields() if f.startswith("train_loss")]


def test_reports_are_written_at_fit_end(clipped_run):
    callback, mon = clipped_run.callback, clipped_run.monitor
    run_dir = callback.session.run_dir
    assert run_dir is not None and run_dir.is_dir()
    assert (run_dir / "report.txt").read_text(encoding="utf-8") == str(mon.report()) + "\n"
    assert (run_dir / "report.html").stat().st_size > 0
    run = gradscope.load_run(run_dir)
    assert run.closed
    np.testing.assert_array_equal(run.history("norm").values, mon.history("norm").values)
    assert str(run.report()) == str(mon.report())


def test_pytorch_lightning_gives_the_same_numbers(clipped_runs):
    import pytorch_lightning

    run, same = clipped_runs("pytorch_lightning", 3), clipped_runs("lightning", 3)
    assert isinstance(run.callback, pytorch_lightning.Callback)
    assert isinstance(run.trainer, pytorch_lightning.Trainer)
    for stat in ("norm", "max_abs", "zeros", "loss"):
        np.testing.assert_array_equal(run.monitor.history(stat).values, same.monitor.history(stat).values)


# ---- 2: a fused optimizer under the scaler -------------------------------------------------


def test_fused_optimizer_gradients_are_unscaled(tmp_path):
    run = _fit(L, GradscopeCallback, tmp_path, accumulate=2, fused=True, scaled_in_hook=True)
    mon, module, trainer = run.monitor, run.module, run.trainer
    optimizer = trainer.optimizers[0]
    assert optimizer.defaults["fused"] and optimizer._step_supports_amp_scaling
    assert mon.step_index == trainer.global_step == 2 * math.ceil(TRAIN / BATCH / 2)
    # Lightning left the gradients scaled in on_before_optimizer_step: the module saw them x1024.
    assert set(module.hook_scales) == {1024.0}
    np.testing.assert_allclose(module.raw_norms, 1024.0 * np.sqrt(mon.history("sumsq").values.sum(axis=1)), rtol=1e-6)
    for stat in ("norm", "max_abs", "zeros"):
        np.testing.assert_allclose(
            mon.history(stat).values, reference(module.grads, mon.rows, stat), rtol=1e-6, err_msg=stat
        )
    np.testing.assert_allclose(mon.history("loss").values, step_losses(module.losses, trainer.global_step), rtol=1e-6)


# ---- 3: NaN under AMP ----------------------------------------------------------------------

NAN_AT = 3


def _skipped(module, steps: int) -> np.ndarray:
    """Reference: the steps whose optimizer.step the GradScaler skipped (no step pre-hook call)."""
    return ~np.isin(np.arange(steps), module.stepped)


@pytest.mark.parametrize("forward", [False, True], ids=["gradients", "forward-stats"])
def test_nan_under_amp_is_recorded_not_dropped(tmp_path, forward):
    module = module_class(L)(nan_at=NAN_AT)
    callback = GradscopeCallback(forward=forward)
    trainer = make_trainer(L, tmp_path, [callback], max_epochs=1, plugins=[scaler_plugin(L)])
    trainer.fit(module, loader(TRAIN, BATCH), loader(VAL, 8, seed=1))
    mon = callback.monitor
    assert trainer.global_step == mon.step_index == TRAIN // BATCH
    expected = reference(module.grads, mon.rows, "nans")
    np.testing.assert_array_equal(expected[NAN_AT], [0, 1])  # only net.2.weight's gradient got the NaN
    assert expected.sum() == 1
    np.testing.assert_array_equal(mon.history("nans").values, expected)
    np.testing.assert_array_equal(mon.history("nonfinite").values, expected)
    # The scaler skipped that step, and only that one; gradscope says so.
    skipped = _skipped(module, trainer.global_step)
    np.testing.assert_array_equal(np.flatnonzero(skipped), [NAN_AT])
    np.testing.assert_array_equal(mon.history("skipped").values.astype(bool), skipped)
    report = mon.report()
    (overflow,) = [f for f in report.findings if f.kind == "overflow"]
    assert overflow.evidence["skipped_steps"] == [NAN_AT]
    nonfinite = [f for f in report.findings if f.kind == "nonfinite"]
    if not forward:
        # README (findings table): steps a GradScaler skipped are `overflow`, not `nonfinite`.
        assert nonfinite == []
    else:
        # Forward statistics see where the NaN was born: in the code that feeds net.2.
        root = nonfinite[0]
        assert root.since_step == NAN_AT and root.evidence["pass"] == "forward"
        assert root.evidence["module"] == "net.2" and root.evidence["where"] == "inputs"
        assert root.evidence["nans"] == 1


def _fit_until_halted(trainer, module) -> gradscope.TrainingHalted | None:
    """``trainer.fit``; the ``TrainingHalted`` that ended it (None if it ended otherwise)."""
    try:
        trainer.fit(module, loader(TRAIN, BATCH), loader(VAL, 8, seed=1))
    except gradscope.TrainingHalted as halted:
        return halted
    return None


@pytest.mark.parametrize(
    ("namespace", "optimizer", "accumulate"),
    [
        ("lightning", "sgd", 1),
        ("lightning", "fused-adam", 1),
        ("pytorch_lightning", "sgd", 1),
        ("pytorch_lightning", "fused-adam", 1),
        ("lightning", "sgd", 2),
    ],
    ids=["lightning-sgd", "lightning-fused-adam", "pytorch_lightning-sgd", "pytorch_lightning-fused-adam", "acc2"],
)
def test_halt_on_nonfinite_keeps_the_nan_steps_update_out_of_the_weights(tmp_path, namespace, optimizer, accumulate):
    """Full precision (no GradScaler to skip the step): net.2.weight's gradient has a NaN at
    step NAN_AT; the optimizer never applies it, and fit ends with gradscope's TrainingHalted."""
    pl, callback_class = _namespace(namespace)
    module = module_class(pl)(nan_at=NAN_AT, fused=optimizer == "fused-adam", lr=0.01)
    callback = callback_class(halt_on=("nonfinite",))
    trainer = make_trainer(pl, tmp_path, [callback], max_epochs=3, accumulate_grad_batches=accumulate)
    halted = _fit_until_halted(trainer, module)
    # The weights are those from before the NaN step: finite, and exactly as they were.
    before = module.weights_at[NAN_AT]
    assert not torch.equal(before["net.2.weight"], module.weights_at[0]["net.2.weight"])  # earlier steps did update
    weights = {name: weight.detach() for name, weight in module.named_parameters()}
    assert [name for name, w in weights.items() if not torch.isfinite(w).all()] == [], "NaN/Inf in the weights"
    assert [name for name, w in weights.items() if not torch.equal(w, before[name])] == [], "updated at the NaN step"
    if optimizer == "fused-adam":
        assert trainer.optimizers[0].defaults["fused"]
    # The NaN was there (the callback saw it), and ended fit before the step completed.
    assert halted is not None, "fit ended without TrainingHalted"
    assert halted is callback.monitor.halted
    assert halted.finding.kind == "nonfinite" and halted.step == NAN_AT
    assert halted.report.findings and halted.finding in halted.report.findings
    assert callback.monitor.history("nans").values[NAN_AT].sum() == 1
    assert trainer.global_step == NAN_AT and trainer.interrupted
    assert callback.stop_reason is not None and "nonfinite" in callback.stop_reason
    report = (callback.session.run_dir / "report.txt").read_text(encoding="utf-8")
    assert "nonfinite" in report and report == str(callback.monitor.report()) + "\n"


def test_halt_on_nonfinite_under_amp_ends_fit_with_training_halted(tmp_path):
    """Forward statistics name the NaN under a GradScaler (which would skip the step anyway):
    the halt ends fit at that step, and the loggers get gradscope's scalars of that step."""
    module = module_class(L)(nan_at=NAN_AT)
    callback = GradscopeCallback(halt_on="nonfinite", forward=True)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(
        L, tmp_path, [callback], max_epochs=10, plugins=[scaler_plugin(L)], logger=logger, log_every_n_steps=50
    )
    halted = _fit_until_halted(trainer, module)
    assert halted is not None and halted.finding.kind == "nonfinite"
    assert trainer.global_step == NAN_AT  # the halting step's optimizer step never ran
    assert module.stepped == list(range(NAN_AT))
    assert callback.stop_reason is not None
    assert "halted" in callback.stop_reason and "nonfinite" in callback.stop_reason
    assert callback.monitor.halted is halted
    assert callback.monitor.history("nans").values[NAN_AT].sum() == 1
    assert (callback.session.run_dir / "report.txt").is_file()  # written on the way out
    # Whatever log_every_n_steps says, the halting step's scalars reach the loggers.
    rows = read_csv_rows(tmp_path / "csv" / "version_0" / "metrics.csv")
    assert logged_at(rows, "gradscope/grad_nonfinite") == {NAN_AT: 1.0}


def test_halt_on_nonfinite_ignores_gradscaler_overflow(tmp_path):
    module = module_class(L)()
    callback = GradscopeCallback(halt_on="nonfinite", report=False)
    trainer = make_trainer(L, tmp_path, [callback], max_epochs=1, plugins=[scaler_plugin(L, init_scale=2.0**16)])
    trainer.fit(module, loader(TRAIN, BATCH), loader(VAL, 8, seed=1))
    mon = callback.monitor
    assert _skipped(module, trainer.global_step)[0]  # the scaler's first step overflowed (2 Inf)
    assert mon.history("infs").values[0].sum() > 0
    assert trainer.global_step == TRAIN // BATCH, callback.stop_reason


def test_gradscaler_skip_of_the_last_step_is_marked(tmp_path):
    module = module_class(L)()
    callback = GradscopeCallback(report=False)
    trainer = make_trainer(L, tmp_path, [callback], max_steps=1, plugins=[scaler_plugin(L, init_scale=2.0**16)])
    trainer.fit(module, loader(TRAIN, BATCH), loader(VAL, 8, seed=1))
    mon = callback.monitor
    assert module.stepped == [] and mon.history("infs").values[0].sum() > 0  # skipped by the scaler
    assert [f.kind for f in mon.report().findings if f.kind == "nonfinite"] == []
    np.testing.assert_array_equal(mon.history("skipped").values, [True])


# ---- 5: early stopping ---------------------------------------------------------------------


def test_early_stopping_ends_fit_at_patience(tmp_path):
    values = [3.0, 2.0, 1.0, 1.5, 1.25, 1.125, 0.5]  # best at the 3rd validation, then 2 without improving
    module = module_class(L)(val_values=values)
    callback = GradscopeCallback(early_stopping=gradscope.EarlyStopping(metric="val_loss", patience=2))
    trainer = make_trainer(L, tmp_path, [callback], max_epochs=20)
    trainer.fit(module, loader(8, BATCH), loader(VAL, 8, seed=1))
    per_epoch = 2
    assert trainer.current_epoch == 5 and trainer.global_step == 5 * per_epoch
    mon = callback.monitor
    assert mon.should_stop and mon.best_value == 1.0
    assert mon.best_step == 3 * per_epoch - 1  # the last step of the 3rd epoch
    np.testing.assert_array_equal(mon.history("val_loss").values[~np.isnan(mon.history("val_loss").values)], values[:5])
    assert callback.stop_reason is not None and "early stopping" in callback.stop_reason


# ---- 8: checkpoint resume ------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # the resumed run saves none
def test_resume_continues_step_numbers_and_early_stopping(tmp_path):
    per_epoch = 2
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = GradscopeCallback(report=False, early_stopping=gradscope.EarlyStopping(patience=2))
    trainer = make_trainer(L, tmp_path, [first, ckpt], max_epochs=3, enable_checkpointing=True)
    trainer.fit(module_class(L)(val_values=[3.0, 2.0, 2.5]), loader(8, BATCH), loader(VAL, 8, seed=1))
    assert trainer.global_step == 3 * per_epoch
    assert first.monitor.best_value == 2.0 and first.monitor.best_step == 2 * per_epoch - 1
    assert not first.monitor.should_stop  # one evaluation without improving, of 2

    second = GradscopeCallback(report=False, early_stopping=gradscope.EarlyStopping(patience=2))
    resumed = make_trainer(L, tmp_path, [second], max_epochs=8)
    module = module_class(L)(val_values=[5.0])  # never improves on the first run's 2.0
    resumed.fit(module, loader(8, BATCH), loader(VAL, 8, seed=1), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    mon = second.monitor
    assert mon.history("norm").steps[0] == 3 * per_epoch  # numbered on from the resumed global_step
    assert module.hook_steps[0] == 3 * per_epoch
    assert mon.best_value == 2.0 and mon.best_step == 2 * per_epoch - 1
    # The patience already used carried over too: one more evaluation without improving stops it.
    assert mon.should_stop and second.stop_reason is not None
    assert resumed.global_step == 4 * per_epoch
    val = mon.history("val_loss")
    np.testing.assert_array_equal(val.steps[~np.isnan(val.values)], [4 * per_epoch - 1])


# ---- 10: bad input -------------------------------------------------------------------------


def test_mode_is_the_trainers():
    with pytest.raises(ValueError, match="mode"):
        GradscopeCallback(mode="backward")


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match="'evry'"):
        GradscopeCallback(evry=2)


# ---- compression readiness ------------------------------------------------------------------


def test_compression_reads_the_weights_the_optimizer_is_about_to_step(tmp_path):
    """Under accumulation and a GradScaler, each optimizer step is read once, and the layers'
    saliency sums Σ g·w of the gradients the optimizer is about to apply and of the weights
    before the update (a step pre-hook of the test's own computes them in float64)."""

    class Copies(L.Callback):
        def __init__(self) -> None:
            self.dots: list[list[float]] = []

        def on_train_start(self, trainer, module) -> None:
            params = list(module.parameters())

            def copy(optimizer, args, kwargs) -> None:
                grads = [(p.grad.double() * p.detach().double()).sum().item() for p in params]
                self.dots.append(grads)

            trainer.optimizers[0].register_step_pre_hook(copy)

    module = module_class(L)()
    copies = Copies()
    callback = GradscopeCallback(compression=True, report=False)
    trainer = make_trainer(
        L, tmp_path, [copies, callback], max_epochs=1, accumulate_grad_batches=2, plugins=[scaler_plugin(L)]
    )
    trainer.fit(module, loader(TRAIN, BATCH), loader(VAL, 8, seed=1))
    mon = callback.monitor
    section = mon.report().compression
    assert section is not None and section.readings == len(copies.dots) == trainer.global_step
    assert {layer.name for layer in section.layers} == set(mon.rows)
    by_param = np.array(copies.dots)
    row_of = np.array([mon.rows.index(name) for name in _param_rows(module, mon)])
    per_layer = np.array([np.abs(by_param[:, row_of == r].sum(axis=1)).sum() for r in range(len(mon.rows))])
    got = np.array([layer.saliency for layer in section.layers])
    np.testing.assert_allclose(got, per_layer, rtol=1e-4)


def _param_rows(module, mon) -> list[str]:
    """The report row of each parameter of ``module``, in ``module.parameters()`` order."""
    names = []
    for name, _ in module.named_parameters():
        owner = name.rsplit(".", 1)[0] if "." in name else "(root)"
        names.append(owner)
    return names
