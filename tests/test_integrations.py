"""TensorBoard and Lightning integrations, against the real packages."""

from __future__ import annotations

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
    with pytest.raises(ImportError, match=rf"pip install 'regcollect\[{extra}\]'"):
        importlib.import_module(f"regcollect.integrations.{module}")


def test_tensorboard_scalars_norms_and_histograms(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install regcollect[tensorboard]")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from regcollect.integrations.tensorboard import log_penalties

    net = model()
    rc.loss()
    writer = SummaryWriter(str(tmp_path))
    logged = log_penalties(writer, 7, weight_norms=True, histograms=True)
    writer.close()
    assert logged == rc.penalties()

    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    for name, value in logged.items():
        (event,) = events.Scalars(f"regularization/{name}")
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
    pytest.importorskip("lightning", reason="pip install regcollect[lightning]")
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
    for name in ("net.0.weight", "net.0.bias", "net.2.weight", "total"):
        assert float(rows[-1][f"reg/{name}"]) == pytest.approx(last[name], rel=1e-6)

    with pytest.raises(TypeError, match="collection must be a regcollect.Collection"):
        RegularizationLogger(collection="default")
