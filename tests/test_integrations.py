"""TensorBoard and Lightning integrations, against the real packages."""

from __future__ import annotations

import copy
import csv
import importlib
import sys

import pytest
import torch

import regcollect as rc


def model():
    return torch.nn.Sequential(
        rc.nn.Linear(4, 8, kernel_regularizer=rc.l2(0.1), bias_regularizer=rc.l1(0.01)),
        torch.nn.ReLU(),
        rc.nn.Linear(8, 1, kernel_regularizer=rc.l1_l2(0.01, 0.02)),
    )


@pytest.mark.parametrize(
    ("module", "extra"), [("tensorboard", "tensorboard"), ("lightning", "lightning")]
)
def test_missing_package_names_the_extra(monkeypatch, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes "import <module>" fail
    monkeypatch.delitem(sys.modules, f"regcollect.integrations.{module}", raising=False)
    with pytest.raises(
        ImportError,
        match=rf"pip install {extra} \(or, in the regcollect checkout, "
        rf"pip install -e '\.\[{extra}\]'\)",
    ):
        importlib.import_module(f"regcollect.integrations.{module}")


def test_tensorboard_scalars_norms_and_histograms(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install -e .[tensorboard]")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from regcollect.integrations.tensorboard import log_penalties

    net = model()
    rc.loss()
    writer = SummaryWriter(str(tmp_path))
    logged = log_penalties(writer, 7, weight_norms=True, histograms=True)
    writer.close()
    assert logged == rc.penalties(prefix="regularization/")

    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    for tag, value in logged.items():
        (event,) = events.Scalars(tag)
        assert event.step == 7 and event.value == pytest.approx(value, rel=1e-6)
    (norm,) = events.Scalars("regularization/norm/0.weight")
    assert norm.value == pytest.approx(net[0].weight.norm().item(), rel=1e-6)
    assert "regularization/weights/2.weight" in tags["histograms"]
    assert "regularization/norm/2.bias" not in tags["scalars"]  # not regularized

    with pytest.raises(TypeError, match="writer must be a SummaryWriter"):
        log_penalties(object(), 0)
    with pytest.raises(ValueError, match="step must be a non-negative int, got -1"):
        log_penalties(writer, -1)


def test_lightning_callback_logs_the_penalties(tmp_path):
    pytest.importorskip("lightning", reason="pip install -e .[lightning]")
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from regcollect.integrations.lightning import RegularizationLogger

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y) + rc.loss()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    trainer = L.Trainer(
        max_steps=4,
        log_every_n_steps=2,
        logger=CSVLogger(str(tmp_path), name="run"),
        callbacks=[RegularizationLogger()],
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=8))

    (metrics,) = tmp_path.glob("run/*/metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("reg/total")]
    assert [int(r["step"]) for r in rows] == [1, 3]  # the trainer's logging steps only
    last = rc.penalties()  # the last step's loss() is the last row logged
    for name in ("net.0.weight", "net.0.bias", "net.2.weight"):
        assert float(rows[-1][f"reg/penalty/{name}"]) == pytest.approx(last[name], rel=1e-6)
    assert float(rows[-1]["reg/total"]) == pytest.approx(last["total"], rel=1e-6)

    with pytest.raises(TypeError, match="collection must be a regcollect.Collection"):
        RegularizationLogger(collection="default")


# --- Hugging Face Trainer ----------------------------------------------------------------------


def _train(transformers, model, rows, trainer_class, tmp_path, batch, accumulation, **kwargs):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        learning_rate=0.05,
        num_train_epochs=1,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_drop_last=True,
        lr_scheduler_type="constant",
        optim="sgd",
    )
    trainer = trainer_class(model=model, args=args, train_dataset=rows, **kwargs)
    if not getattr(model, "uses_num_items_in_batch", True):
        # BERT's classification loss is a mean that ignores num_items_in_batch: tell the
        # Trainer so, and it divides the loss by the accumulation steps (its other path).
        trainer.model_accepts_loss_kwargs = False
    trainer.train()
    return trainer


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_transformers_trainer_adds_the_penalty_once_per_step(kind, tmp_path, tiny_hf_models):
    transformers = pytest.importorskip("transformers", reason="pip install -e .[transformers]")
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from regcollect.integrations.transformers import RegularizedTrainer

    # BERT's loss is divided by the accumulation steps by the Trainer; GPT-2 takes
    # num_items_in_batch, so the Trainer does not divide its loss: both of its paths.
    model, rows = tiny_hf_models(transformers)[kind]
    if kind == "bert":
        model.uses_num_items_in_batch = False
    initial = copy.deepcopy(model.state_dict())
    reg = rc.l2(0.05)

    def run(trainer_class, batch, accumulation, **kwargs):
        model.load_state_dict(initial)
        coll = rc.Collection()
        rc.regularize(model, kernel=reg, embeddings=reg, collection=coll)
        if trainer_class is RegularizedTrainer:
            kwargs["regularization_collection"] = coll
        else:
            kwargs = {"coll": coll}
        trainer = _train(
            transformers, model, rows, trainer_class, tmp_path, batch, accumulation, **kwargs
        )
        return trainer, {k: v.detach().clone() for k, v in model.named_parameters()}

    class HandWritten(transformers.Trainer):  # what users write today, without accumulation
        def __init__(self, *args, coll, **kwargs):
            super().__init__(*args, **kwargs)
            self.coll = coll

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            return loss + self.coll.loss(model)

    _, hand = run(HandWritten, batch=8, accumulation=1)
    trainer, ours = run(RegularizedTrainer, batch=8, accumulation=1)
    _, accumulated = run(RegularizedTrainer, batch=4, accumulation=2)
    moved = max(float((hand[k] - initial[k]).abs().max()) for k in hand)
    assert moved > 1e-3
    for name in hand:
        assert torch.allclose(ours[name], hand[name], atol=1e-6), name
        # two micro-batches of 4 = one batch of 8: the penalty counted once per step
        assert torch.allclose(accumulated[name], hand[name], atol=1e-5), name
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and logged[-1]["reg/total"] > 0
    # The default log is compact: the total alone.
    assert [key for key in logged[-1] if key.startswith("reg/")] == ["reg/total"]


def test_the_trainer_logs_the_total_per_module_or_per_parameter():
    """``regularization_log`` picks what a training log gets: the values of the last loss()."""
    transformers = pytest.importorskip("transformers")
    from regcollect.integrations.transformers import RegularizationMixin

    class Logging:  # stands for the Trainer: what the mixin's log() hands on
        def __init__(self, model):
            self.model, self.logged = model, None

        def log(self, logs):
            self.logged = logs

    class Trainer(RegularizationMixin, Logging):
        pass

    del transformers
    coll = rc.Collection()
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    rc.regularize(model, kernel=rc.l2(0.1), bias=rc.l1(0.2), collection=coll)
    coll.loss(model)
    want = coll.penalties(model)
    by_mode = {}
    for mode in ("total", "per_module", "per_parameter"):
        trainer = Trainer(model, regularization_collection=coll, regularization_log=mode)
        trainer.log({"loss": 1.0})
        by_mode[mode] = trainer.logged
    assert by_mode["total"] == {"loss": 1.0, "reg/total": want["total"]}
    entries = {f"reg/penalty/{k}": v for k, v in want.items() if k != "total"}
    assert by_mode["per_parameter"] == {"loss": 1.0, **entries, "reg/total": want["total"]}
    per_module = by_mode["per_module"]
    assert set(per_module) == {"loss", "reg/module/0", "reg/module/2", "reg/total"}
    assert per_module["reg/module/0"] == pytest.approx(want["0.weight"] + want["0.bias"])
    with pytest.raises(ValueError, match="regularization_log must be one of"):
        Trainer(model, regularization_collection=coll, regularization_log="all")


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_weight_decay_is_reproduced_exactly(accumulation, tmp_path, tiny_hf_models):
    """``Trainer(weight_decay=wd)`` (its AdamW, its decay set) is ``weight_decay=0``,
    ``regularize(model, rc.l2(wd / 2))`` and ``regularization_in_step="decoupled"``: the same
    weights, bit for bit, on five architectures, with gradient accumulation too."""
    transformers = pytest.importorskip("transformers", reason="pip install -e .[transformers]")
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from regcollect.integrations.transformers import RegularizedTrainer, regularize

    wd = 0.1

    def collate(rows):
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0] if k != "return_loss"}
        return {**batch, "return_loss": True} if "return_loss" in rows[0] else batch

    def train(model, rows, trainer_class, weight_decay, **kwargs):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=8 // accumulation,
            gradient_accumulation_steps=accumulation,
            learning_rate=0.01,
            weight_decay=weight_decay,
            max_steps=3,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            seed=0,
            data_seed=0,
            remove_unused_columns=False,
        )
        trainer_class(
            model=model, args=args, train_dataset=rows, data_collator=collate, **kwargs
        ).train()
        return dict(model.named_parameters())

    for name, (model, rows) in tiny_hf_models(transformers).items():
        if rows is None:
            continue
        initial = copy.deepcopy(model.state_dict())
        want = {
            k: v.detach().clone() for k, v in train(model, rows, transformers.Trainer, wd).items()
        }
        model.load_state_dict(initial)
        coll = rc.Collection()
        regularize(model, rc.l2(wd / 2), collection=coll)
        got = train(
            model,
            rows,
            RegularizedTrainer,
            0.0,
            regularization_collection=coll,
            regularization_in_step="decoupled",
        )
        moved = max(float((want[k] - initial[k]).abs().max()) for k in want)
        assert moved > 1e-3, name
        for k in want:
            assert torch.equal(got[k], want[k]), (name, k, float((got[k] - want[k]).abs().max()))


def test_regularized_trainer_resumed_from_a_checkpoint_resumes_the_schedules(
    tmp_path, tiny_hf_models
):
    """4 steps straight against 2 steps, a checkpoint, and ``train(resume_from_checkpoint=)``
    with a model and Trainer built afresh: the schedule is at step 4 and the weights equal."""
    transformers = pytest.importorskip("transformers", reason="pip install -e .[transformers]")
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from regcollect.integrations.transformers import RegularizedTrainer

    model, rows = tiny_hf_models(transformers)["bert"]
    initial = copy.deepcopy(model.state_dict())

    def run(out, max_steps, resume=None):
        model.load_state_dict(initial)
        coll = rc.Collection()
        schedule = rc.schedules.warmup(0.5, steps=4)
        rc.regularize(model, kernel=rc.l2(schedule), collection=coll)
        args = transformers.TrainingArguments(
            output_dir=str(out),
            per_device_train_batch_size=4,
            learning_rate=0.05,
            max_steps=4,
            report_to=[],
            save_strategy="steps",
            save_steps=2,
            use_cpu=True,
            seed=0,
            data_seed=0,
            lr_scheduler_type="constant",
            optim="sgd",
        )
        trainer = RegularizedTrainer(
            model=model, args=args, train_dataset=rows, regularization_collection=coll
        )
        if max_steps < 4:
            trainer.add_callback(_StopAt(max_steps, transformers))
        trainer.train(resume_from_checkpoint=resume)
        return schedule, {k: v.detach().clone() for k, v in model.named_parameters()}

    straight_schedule, straight = run(tmp_path / "straight", 4)
    run(tmp_path / "interrupted", 2)
    schedule, resumed = run(
        tmp_path / "interrupted", 4, resume=str(tmp_path / "interrupted" / "checkpoint-2")
    )
    assert schedule.step == straight_schedule.step == 4
    moved = max(float((straight[k] - initial[k]).abs().max()) for k in straight)
    assert moved > 1e-3
    for name in straight:
        assert torch.allclose(resumed[name], straight[name], atol=1e-6), name


class _StopAt:
    """A Trainer callback ending training after ``steps`` steps (an interrupted run)."""

    def __new__(cls, steps, transformers):
        class Stop(transformers.TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= steps:
                    control.should_training_stop = True

        return Stop()


def test_lightning_resumed_from_a_checkpoint_resumes_the_schedules(tmp_path):
    """2 epochs of 2 steps straight, against 1 epoch, ``trainer.save_checkpoint`` and
    ``fit(ckpt_path=...)`` with a module and Trainer built afresh."""
    pytest.importorskip("lightning", reason="pip install -e .[lightning]")
    import lightning as L

    from regcollect.integrations.lightning import RegularizationLogger

    torch.manual_seed(0)
    initial = model().state_dict()
    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randn(16, 1))

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model()
            self.net.load_state_dict(initial)
            self.schedule = rc.schedules.warmup(0.5, steps=4)
            rc.regularize(self.net, kernel=rc.l2(self.schedule))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y) + rc.loss(self.net)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def fit(max_epochs, ckpt_path=None):
        module = Module()
        trainer = L.Trainer(
            max_epochs=max_epochs,
            logger=False,
            callbacks=[RegularizationLogger()],
            accelerator="cpu",
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        loader = torch.utils.data.DataLoader(data, batch_size=8)
        trainer.fit(module, loader, ckpt_path=ckpt_path)
        rc.get_collection().remove(module)
        return trainer, module

    _, straight = fit(2)
    trainer, _ = fit(1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    _, resumed = fit(2, ckpt_path=tmp_path / "epoch1.ckpt")
    assert resumed.schedule.step == straight.schedule.step == 4
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, rtol=4e-6, atol=1e-7)


def test_transformers_trainer_builds_its_optimizer_from_param_groups(tmp_path, tiny_hf_models):
    """``optimizer_cls_and_kwargs=(AdamW, {"params": rc.param_groups(model)})``: the
    Trainer's optimizer decays exactly the declared tensors, bit for bit as hand-made groups
    with ``weight_decay`` on the same tensors; RegularizedTrainer still logs the penalty."""
    transformers = pytest.importorskip("transformers", reason="pip install -e .[transformers]")
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from regcollect.integrations.transformers import RegularizedTrainer

    model, rows = tiny_hf_models(transformers)["bert"]
    model.uses_num_items_in_batch = False
    initial = copy.deepcopy(model.state_dict())
    coll = rc.Collection()
    with rc.regularize(model, kernel=rc.l2(0.05), collection=coll):  # its set of tensors
        kernels = {id(e.resolve()) for e in coll.entries()}
    hand_made = [
        {"params": [p for p in model.parameters() if id(p) in kernels], "weight_decay": 0.1},
        {"params": [p for p in model.parameters() if id(p) not in kernels], "weight_decay": 0.0},
    ]
    _train(
        transformers,
        model,
        rows,
        transformers.Trainer,
        tmp_path,
        4,
        1,
        optimizer_cls_and_kwargs=(torch.optim.AdamW, {"params": hand_made, "lr": 0.01}),
    )
    want = {k: v.detach().clone() for k, v in model.named_parameters()}

    model.load_state_dict(initial)
    rc.regularize(model, kernel=rc.l2(0.05), collection=coll)
    groups = rc.param_groups(model, collection=coll)
    trainer = _train(
        transformers,
        model,
        rows,
        RegularizedTrainer,
        tmp_path,
        4,
        1,
        regularization_collection=coll,
        optimizer_cls_and_kwargs=(torch.optim.AdamW, {"params": groups, "lr": 0.01}),
    )
    for name, p in model.named_parameters():
        assert torch.equal(p, want[name]), name
    logged = [h["reg/total"] for h in trainer.state.log_history if "reg/total" in h]
    assert logged and logged[-1] > 0


class _Totalled(torch.nn.Module):
    """A root parameter named ``total`` and a scope named ``norm``: names that the loggers'
    own keys (the sum, the weight norms) must never take."""

    def __init__(self):
        super().__init__()
        self.total = torch.nn.Parameter(torch.full((2,), 3.0))
        with rc.scope("norm"):
            self.inner = rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(0.5), bias=False)
        torch.nn.init.constant_(self.inner.weight, 1.0)


def _totalled():
    net = _Totalled()
    rc.add_regularizer(net, "total", rc.l1(0.25))
    rc.loss(net)
    return net  # penalties: total 0.25 * 6 = 1.5, norm/inner.weight 0.5 * 4 = 2.0, sum 3.5


def test_logged_keys_keep_the_sum_apart_from_every_name():
    net = _totalled()
    assert rc.penalties(net) == {"total": 1.5, "norm/inner.weight": 2.0, "total (sum)": 3.5}
    assert rc.penalties(net, prefix="reg/") == {
        "reg/penalty/total": 1.5,
        "reg/penalty/norm/inner.weight": 2.0,
        "reg/total": 3.5,
    }
    by_module = rc.penalties(net, by="module", prefix="")
    assert by_module == {"module/(root)": 1.5, "module/norm/inner": 2.0, "total": 3.5}
    assert rc.penalties(net, by="total", prefix="r.") == {"r.total": 3.5}
    with pytest.raises(TypeError, match="prefix must be a string or None, got int"):
        rc.penalties(net, prefix=1)


def test_tensorboard_total_is_the_sum_whatever_the_entries_are_named(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install -e .[tensorboard]")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from regcollect.integrations.tensorboard import log_penalties

    net = _totalled()
    with SummaryWriter(str(tmp_path)) as writer:
        logged = log_penalties(writer, 1, scope=net, weight_norms=True)
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {tag: events.Scalars(tag)[0].value for tag in events.Tags()["scalars"]}
    assert scalars == pytest.approx(
        {
            "regularization/total": 3.5,
            "regularization/penalty/total": 1.5,
            "regularization/penalty/norm/inner.weight": 2.0,
            "regularization/norm/total": 18**0.5,  # the values 3, 3
            "regularization/norm/norm/inner.weight": 2.0,
        }
    )
    assert logged == {k: v for k, v in scalars.items() if not k.startswith("regularization/norm/")}
