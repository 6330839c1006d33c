"""The Hugging Face ``Trainer`` under DeepSpeed, run by ``test_deepspeed.py``.

``python trainer_worker.py reference OUT``: ``RegularizedTrainer`` in one process (the
reference). ``torchrun --nproc_per_node=2 trainer_worker.py zero2,zero3 OUT``: the same Trainer
with a DeepSpeed config of each stage, on 2 gloo ranks. Each writes, per run, the weights and
the ``reg/total`` the Trainer logged at each step.

On a CPU, accelerate does not shard the data for DeepSpeed (it sees one process), so both ranks
train on the same batches of 4, the reference's: DeepSpeed still partitions the parameters and
averages the two ranks' gradients, which is what the penalty must survive.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/conftest.py

import transformers

import regcollect as rc
from conftest import tiny_models
from regcollect.integrations.transformers import RegularizedTrainer


def train(out: Path, name: str, stage: int | None) -> None:
    model, rows = tiny_models(transformers)["bert"]
    if stage is None:
        torch.save(dict(model.state_dict()), out / "initial.pt")
    coll = rc.Collection()
    rc.regularize(model, kernel=rc.l2(0.05), embeddings=rc.l2(0.05), collection=coll)
    deepspeed: dict[str, Any] | None = None
    if stage is not None:
        deepspeed = {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",  # max_grad_norm below: no clipping, as one process
            # Partitioned as a large model's: no rank holds a whole parameter outside forward.
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
            "zero_allow_untested_optimizer": True,
        }
    args = transformers.TrainingArguments(
        output_dir=str(out / name),
        per_device_train_batch_size=4,
        learning_rate=0.05,
        num_train_epochs=1,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        data_seed=0,
        dataloader_drop_last=True,
        lr_scheduler_type="constant",
        optim="sgd",
        max_grad_norm=0.0,
        use_cpu=stage is None,
        deepspeed=deepspeed,
    )
    trainer = RegularizedTrainer(
        model=model, args=args, train_dataset=rows, regularization_collection=coll
    )
    trainer.model_accepts_loss_kwargs = False  # BERT's loss is a plain mean
    trainer.train()
    logged = [e["reg/total"] for e in trainer.state.log_history if "reg/total" in e]
    params = list(trainer.model_wrapped.module.parameters()) if stage else []
    if stage == 3:
        import deepspeed as ds

        with ds.zero.GatheredParameters(params):
            weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    else:
        weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    torch.save(weights, out / f"{name}.rank{rank}.pt")
    (out / f"{name}.rank{rank}.json").write_text(json.dumps(logged))


def main(runs: str, out: str) -> None:
    if runs != "reference":
        import deepspeed

        # The shared-memory op DeepSpeed compiles on its first CPU run is not needed (gloo).
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda *a, **k: None  # type: ignore[attr-defined]
        deepspeed.init_distributed(dist_backend="gloo")
        torch.set_num_threads(1)
    for name in runs.split(","):
        train(Path(out), name, None if name == "reference" else int(name.removeprefix("zero")))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
