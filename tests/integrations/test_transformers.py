"""``GradscopeCallback`` in a real Hugging Face ``Trainer.train``, checked against float64
references taken independently of gradscope.

The reference gradients are float64 copies of every ``.grad`` at the moment the Trainer's own
``accelerator.clip_grad_norm_`` has unscaled them and not yet clipped them
(:func:`grad_reference.record_after_unscale`). fp16 runs get a real GradScaler: on the CPU
accelerate gives fp16 none (:func:`grad_reference.give_real_grad_scaler`).
"""

from __future__ import annotations

import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from grad_reference import give_real_grad_scaler, grads64, record_after_unscale, row_stats, total_norm
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import gradscope
from gradscope.actions.early_stopping import EarlyStopping
from gradscope.integrations.transformers import GradscopeCallback

torch.set_num_threads(1)

BATCH = 4
TRAIN_SIZE = 20  # 5 micro-batches an epoch: with 3 per step the last window of each epoch has 2
MAX_GRAD_NORM = 0.02  # far below the gradients' norm (0.1 to 1): every step is clipped
EVAL_STEPS = 2

try:
    import tensorboard  # noqa: F401

    HAVE_TENSORBOARD = True
except ImportError:
    HAVE_TENSORBOARD = False


class Tokens(torch.utils.data.Dataset):
    """Random token sequences; ``labels`` are classes (``lm=False``) or the tokens themselves."""

    def __init__(self, size: int, seed: int, lm: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 50, (size, 8), generator=g)
        self.y = self.x.clone() if lm else torch.randint(0, 2, (size,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2))


def one_layer_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))


class ReferenceTrainer(Trainer):
    """A Trainer that records, per optimizer step: the float64 gradients after unscaling and
    before clipping (``pre_clip``), after clipping (``post_clip``), the GradScaler's scale
    (``scales``), and every training micro-batch's loss as the model returned it (``losses``,
    one list per step, read by a forward hook of its own)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pre_clip: list = []
        self.post_clip: list = []
        self.scales: list = []
        self.losses: list[list[float]] = []
        self._micro: list[float] = []
        self.model.register_forward_hook(self._take_loss)
        record_after_unscale(self.accelerator, self.model, self.pre_clip, self.scales)

    def _take_loss(self, module, args, output) -> None:
        if module.training and torch.is_grad_enabled():
            self._micro.append(output.loss.detach().item())

    def _clip_grad_norm(self, model):
        self.losses.append(self._micro)
        self._micro = []
        norm = super()._clip_grad_norm(model)
        self.post_clip.append(grads64(self.model))
        return norm


def arguments(out: Path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        max_grad_norm=MAX_GRAD_NORM,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def make_trainer(args, model, train, callback, cls=Trainer, evaluate=None):
    """A Trainer with ``callback`` (and without the PrinterCallback that ``disable_tqdm``
    adds: it prints every log dictionary, hundreds of per-layer scalars)."""
    trainer = cls(model=model, args=args, train_dataset=train, eval_dataset=evaluate, callbacks=[callback])
    trainer.remove_callback(PrinterCallback)
    return trainer


def assert_matches_reference(mon, trainer) -> None:
    """Per-layer norm, max |g| and zeros equal the unscaled, unclipped float64 reference at
    every optimizer step, and clipping really changed the gradients."""
    steps = trainer.state.global_step
    assert mon.step_index == steps
    assert mon.errors == []
    assert len(trainer.pre_clip) == len(trainer.post_clip) == steps
    reference = row_stats(trainer.pre_clip, mon.rows)
    assert np.isfinite(reference["norm"]).all()  # every layer had a gradient at every step
    for field, rtol in (("norm", 1e-6), ("max_abs", 1e-6), ("zeros", 0)):
        series = mon.history(field)
        np.testing.assert_array_equal(series.steps, np.arange(steps))
        assert series.rows == mon.rows
        np.testing.assert_allclose(series.values, reference[field], rtol=rtol, atol=0, err_msg=field)
    pre = np.array([total_norm(g) for g in trainer.pre_clip])
    post = np.array([total_norm(g) for g in trainer.post_clip])
    assert (pre > 2 * MAX_GRAD_NORM).all()
    np.testing.assert_allclose(post, MAX_GRAD_NORM, rtol=1e-4)  # clipped: what gradscope must not see


# ---- one fp16 run per accumulation, several checks on each -----------------------------------


@pytest.fixture(scope="module", params=[(1, True), (3, False)], ids=["accumulate1-layers", "accumulate3-summary"])
def fp16_run(request, tmp_path_factory):
    """A real fp16 ``Trainer.train`` (GradScaler, clipping, evaluation, TensorBoard), with
    ``gradient_accumulation_steps`` 1 (and ``log_layers=True``) or 3 (short last windows)."""
    accumulation, log_layers = request.param
    out = tmp_path_factory.mktemp(f"hf-fp16-{accumulation}")
    callback = GradscopeCallback(log_layers=log_layers)
    args = arguments(
        out,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=2,
        eval_strategy="steps",
        eval_steps=EVAL_STEPS,
        fp16=True,
        report_to=["tensorboard"] if HAVE_TENSORBOARD else [],
    )
    trainer = make_trainer(args, tiny_bert(), Tokens(TRAIN_SIZE, seed=1), callback, ReferenceTrainer, Tokens(8, seed=2))
    give_real_grad_scaler(trainer.accelerator)
    trainer.train()
    return types.SimpleNamespace(
        trainer=trainer,
        callback=callback,
        mon=callback.monitor,
        out=out,
        accumulation=accumulation,
        log_layers=log_layers,
        windows=[1] * 10 if accumulation == 1 else [3, 2, 3, 2],  # micro-batches per optimizer step
    )


def test_fp16_numbers_are_the_unscaled_pre_clip_gradients(fp16_run):
    run = fp16_run
    assert [len(losses) for losses in run.trainer.losses] == run.windows  # shorter last windows (accumulating)
    assert_matches_reference(run.mon, run.trainer)
    # A real GradScaler, whose scale changed during the run: gradscope unscaled each step by its own scale.
    scales = run.trainer.scales
    assert None not in scales and len(set(scales)) > 1
    np.testing.assert_array_equal(run.mon.history("grad_scale").values, scales)


def scalar_events(out: Path) -> dict[str, dict[int, float]]:
    """Every scalar the Trainer's TensorBoardCallback wrote under ``out``: tag -> {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    directories = {path.parent for path in out.rglob("events.out.tfevents.*")}
    assert len(directories) == 1, directories
    events = EventAccumulator(str(directories.pop()), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_total_norm_reaches_tensorboard_and_equals_the_trainers_grad_norm(fp16_run):
    pytest.importorskip("tensorboard")
    run = fp16_run
    scalars = scalar_events(run.out)
    ours = [tag for tag in scalars if tag.endswith("gradscope/grad_norm")]
    assert ours == ["train/gradscope/grad_norm"]  # HF's TensorBoardCallback prefixes train/
    theirs = scalars["train/grad_norm"]
    mine = scalars["train/gradscope/grad_norm"]
    steps = run.trainer.state.global_step
    assert sorted(mine) == sorted(theirs) == list(range(1, steps + 1))  # logging_steps=1
    for step in mine:  # the same optimizer step (TensorBoard stores float32)
        assert mine[step] == pytest.approx(theirs[step], rel=1e-5), step
        assert mine[step] == pytest.approx(total_norm(run.trainer.pre_clip[step - 1]), rel=1e-5), step
    layer_tags = {tag for tag in scalars if "grad_norm/" in tag and "gradscope/" not in tag}
    if not run.log_layers:
        assert layer_tags == set()
        return
    assert layer_tags == {f"train/grad_norm/{row}" for row in run.mon.rows}
    reference = row_stats(run.trainer.pre_clip, run.mon.rows)["norm"]
    for j, row in enumerate(run.mon.rows):
        logged = scalars[f"train/grad_norm/{row}"]
        assert sorted(logged) == list(range(1, steps + 1))
        np.testing.assert_allclose([logged[s] for s in sorted(logged)], reference[:, j], rtol=1e-5, err_msg=row)


def test_loss_is_the_trainers_logged_loss_under_fp16(fp16_run):
    run = fp16_run
    loss = run.mon.history("loss")
    np.testing.assert_array_equal(loss.steps, np.arange(run.trainer.state.global_step))
    logged = [h["loss"] for h in run.trainer.state.log_history if "loss" in h]  # logging_steps=1
    np.testing.assert_allclose(loss.values, logged, rtol=1e-6)
    # The Trainer's rule, from the micro-batch losses the model returned: a model whose forward
    # takes **kwargs (BERT does) is handed num_items_in_batch and its losses are added up;
    # otherwise each is divided by the number of micro-batches (their mean).
    combine = np.sum if run.trainer.model_accepts_loss_kwargs else np.mean
    expected = [float(combine(np.asarray(losses, dtype=np.float64))) for losses in run.trainer.losses]
    np.testing.assert_allclose(loss.values, expected, rtol=1e-6)
    if run.accumulation > 1:  # every micro-batch counts, not only the last one
        assert any(abs(combine(losses) - losses[-1]) > 1e-4 for losses in run.trainer.losses)


def test_eval_loss_is_a_metric_and_eval_runtime_is_not(fp16_run):
    run = fp16_run
    evaluations = [(h["step"], h["eval_loss"]) for h in run.trainer.state.log_history if "eval_loss" in h]
    assert len(evaluations) == run.trainer.state.global_step // EVAL_STEPS
    series = run.mon.history("eval_loss")
    logged = np.isfinite(series.values)
    # One value per evaluation, attached to the optimizer step just closed (global_step - 1).
    np.testing.assert_array_equal(series.steps[logged], [step - 1 for step, _ in evaluations])
    np.testing.assert_array_equal(series.values[logged], [value for _, value in evaluations])
    fields = run.mon.fields()
    for name in ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch"):
        assert name not in fields


def test_run_log_and_report_files(fp16_run):
    run = fp16_run
    run_dirs = sorted((run.out / "gradscope").glob("run-*"))
    assert run_dirs == [run.callback.session.run_dir]
    logged = gradscope.load_run(run_dirs[0])
    assert logged.closed
    assert logged.rows == run.mon.rows
    for field in ("norm", "max_abs", "zeros", "loss", "eval_loss"):
        np.testing.assert_array_equal(logged.history(field).values, run.mon.history(field).values, err_msg=field)
    report = str(run.mon.report())
    assert (run_dirs[0] / "report.txt").read_text(encoding="utf-8") == report + "\n"
    assert str(logged.report()) == report


# ---- bf16: no scaler -----------------------------------------------------------------------


def test_bf16_gpt2_numbers_without_a_scaler(tmp_path):
    callback = GradscopeCallback(report=False)
    args = arguments(tmp_path, gradient_accumulation_steps=3, num_train_epochs=2, bf16=True)
    trainer = make_trainer(args, tiny_gpt2(), Tokens(TRAIN_SIZE, seed=3, lm=True), callback, ReferenceTrainer)
    trainer.train()
    assert trainer.accelerator.scaler is None and trainer.accelerator.native_amp  # bf16 autocast, nothing scaled
    assert [len(losses) for losses in trainer.losses] == [3, 2, 3, 2]
    mon = callback.monitor
    assert "transformer.wte" in mon.rows and "lm_head" not in mon.rows  # tied: one row, both uses summed
    assert_matches_reference(mon, trainer)
    assert np.isnan(mon.history("grad_scale").values).all()


# ---- actions: halting and early stopping -----------------------------------------------------


class WeightsAtStepBegin(TrainerCallback):
    """Records a copy of every weight at each optimizer step's first micro-batch (before its
    update), keyed by ``state.global_step``."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_halt_on_nonfinite_keeps_the_nan_steps_update_out_of_the_weights(tmp_path, accumulation):
    """One micro-batch of optimizer step 2 turns NaN in GPT-2's MLP: the NaN reaches the loss
    and every gradient. No GradScaler would skip the step; gradscope ends ``train()`` with
    ``TrainingHalted`` before ``optimizer.step()``, so the weights are those before step 2."""
    max_steps, poisoned = 8, 2
    callback = GradscopeCallback(halt_on=("nonfinite",))
    weights = WeightsAtStepBegin()
    args = arguments(tmp_path, max_steps=max_steps, gradient_accumulation_steps=accumulation, max_grad_norm=1.0)
    model = one_layer_gpt2()
    forwards = []

    def poison(module, inputs, output):
        if module.training:
            forwards.append(None)
            if len(forwards) == poisoned * accumulation + 1:  # the first micro-batch of step 2
                return output * math.nan
        return None

    model.transformer.h[0].mlp.register_forward_hook(poison)
    trainer = make_trainer(args, model, Tokens(64, seed=1, lm=True), callback)
    trainer.add_callback(weights)
    try:
        trainer.train()
        halted = None
    except gradscope.TrainingHalted as error:
        halted = error
    before = weights.weights[poisoned]
    assert not torch.equal(
        before["transformer.wte.weight"], weights.weights[0]["transformer.wte.weight"]
    )  # earlier steps did update
    after = {name: p.detach() for name, p in model.named_parameters()}
    assert [name for name, w in after.items() if not torch.isfinite(w).all()] == [], "NaN/Inf in the weights"
    assert [name for name, w in after.items() if not torch.equal(w, before[name])] == [], "updated at the NaN step"
    assert halted is not None, "train() ended without TrainingHalted"
    assert halted is callback.monitor.halted and halted.finding.kind == "nonfinite" and halted.step == poisoned
    assert trainer.state.global_step == poisoned  # the halting step never completed
    assert callback.stop_reason is not None and callback.stop_reason.startswith("gradscope halted training")
    nonfinite = callback.monitor.history("nonfinite").values
    assert (nonfinite[:poisoned] == 0).all() and (nonfinite[poisoned] > 0).any()
    # The run was ended on the way out: run log closed, report written, no hook left on the model.
    report = (callback.session.run_dir / "report.txt").read_text(encoding="utf-8")
    assert "nonfinite" in report and report == str(callback.monitor.report()) + "\n"
    assert gradscope.load_run(callback.session.run_dir).closed
    assert not model._forward_hooks


# ---- the loss: the Trainer's own, under accumulation -----------------------------------------


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_loss_is_the_trainers_logged_loss(tmp_path, name, accumulation):
    """``mon.history("loss")`` equals the ``loss`` the Trainer logs at every step
    (``logging_steps=1``): for GPT-2, whose loss the Trainer normalises over the whole
    accumulated batch (``num_items_in_batch``), and for BERT; 5 micro-batches, so with
    accumulation 2 the last window has one."""
    callback = GradscopeCallback(report=False, log_dir=None)
    args = arguments(tmp_path, gradient_accumulation_steps=accumulation, num_train_epochs=1, max_grad_norm=1.0)
    lm = name == "gpt2"
    model = one_layer_gpt2() if lm else tiny_bert()
    trainer = make_trainer(args, model, Tokens(TRAIN_SIZE, seed=4, lm=lm), callback)
    trainer.train()
    logged = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    assert [step for step, _ in logged] == list(range(1, trainer.state.global_step + 1))
    assert trainer.state.global_step == math.ceil(TRAIN_SIZE / BATCH / accumulation)
    loss = callback.monitor.history("loss")
    np.testing.assert_array_equal(loss.steps, np.arange(trainer.state.global_step))
    np.testing.assert_allclose(loss.values, [value for _, value in logged], rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("early_stopping", "patience"),
    [(True, 5), (EarlyStopping(metric="eval_loss", patience=2), 2)],
    ids=["true-watches-eval_loss", "patience2"],
)
def test_early_stopping_on_eval_loss_that_never_improves(tmp_path, early_stopping, patience):
    callback = GradscopeCallback(early_stopping=early_stopping, report=False)
    args = arguments(tmp_path, max_steps=20, learning_rate=0.0, eval_strategy="steps", eval_steps=1)
    trainer = make_trainer(args, tiny_bert(), Tokens(40, seed=1), callback, evaluate=Tokens(8, seed=2))
    trainer.train()
    losses = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(set(losses)) == 1  # lr=0: the same loss at every evaluation
    # The first evaluation sets the best value; ``patience`` more without improvement stop the run.
    assert trainer.state.global_step == len(losses) == patience + 1
    assert callback.stop_reason is not None and "early stopping" in callback.stop_reason
    assert callback.monitor.best_step == 0


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "value"), [("scaler", None), ("accumulation_steps", 3), ("mode", "step")])
def test_options_the_trainer_sets_are_refused(name, value):
    with pytest.raises(ValueError, match=name):
        GradscopeCallback(**{name: value})


def test_compression_section_from_the_trainer(tmp_path):
    """The callback passes the Trainer's optimizer: one weight reading per optimizer step
    (under accumulation), a verdict for every matrix and a ranking of every row."""
    callback = GradscopeCallback(report=False, compression=True)
    args = arguments(tmp_path, gradient_accumulation_steps=2, num_train_epochs=1)
    trainer = make_trainer(args, tiny_gpt2(), Tokens(TRAIN_SIZE, seed=3, lm=True), callback)
    trainer.train()
    mon = callback.monitor
    section = mon.report().to_dict()["compression"]
    assert section["readings"] == trainer.state.global_step > 0 and mon.errors == []
    assert sorted(section["least_important"]) == sorted(mon.rows)
    matrices = [layer for layer in section["layers"] if layer["quantized_numel"] > 0]
    assert "transformer.wte" in {layer["name"] for layer in matrices}
    assert all(layer["verdict"] in ("ready", "per-channel scaling needed", "keep in 16-bit") for layer in matrices)
