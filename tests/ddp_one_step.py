"""One optimizer step of a tiny model through the project's own builders, recording the loss and updated weights.

Run in the test process for the 1-process reference (`one_step`), and under torchrun for 2 gloo processes:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_one_step.py OUT DATA MODEL...

torchrun creates the processes, so Lightning (TorchElasticEnvironment) does not re-launch the script and every
model's step runs in one pair of processes (one interpreter start-up for all three models). Rank 0 writes
OUT/<model>.pt: {"loss": the global batch's loss (mean of the ranks' means), "ids": the stories of the step,
"initial" / "state": the state dict before / after the step}.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.conftest import TINY_DEMO, compose_cfg  # noqa: E402

GLOBAL_BATCH = 4  # split over the processes by the data module (2 stories each on 2 processes)

# One step, nothing else: no validation, no sampling callbacks, no logger. Adam's first update is
# lr * g / (|g| + eps), about +-lr for any gradient well above eps, so a gradient within float noise of zero (summed
# in another order across processes) could flip a whole +-lr step; eps=1e-4 keeps the update proportional to such
# gradients, and the comparison measures DDP, not that amplification.
STEP = ["model.optimizer.eps=1e-4", *TINY_DEMO, f"data.batch_size={GLOBAL_BATCH}", "trainer.max_epochs=1", "trainer.max_steps=1",
        "trainer.limit_val_batches=0", "trainer.enable_model_summary=false", "+trainer.enable_progress_bar=false",
        "callbacks=none", "logger=none", "print_config=false", "test_after_fit=false"]

# what each model's step draws at random (per story, so the draws are the same on any number of processes)
MODEL_OVERRIDES = {
    "arldm_tiny": [],                               # noise, timesteps, posterior sample, cfg_dropout 0.1 rows
    "mindalle_tiny": [],
    "mega_tiny": ["model.train.text_dropout=0.5"],  # caption dropout rows
}


class RecordStep(L.Callback):
    """The step's loss (averaged over processes, i.e. the global batch's) and story ids."""

    def __init__(self) -> None:
        self.loss: float | None = None
        self.ids: list[str] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach().double().clone()
        ids = list(batch["ids"])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(loss)
            loss /= torch.distributed.get_world_size()
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, ids)
            ids = [i for part in gathered for i in part]
        self.loss, self.ids = float(loss), sorted(ids)


def one_step(model: str, trainer: str, work: Path, data_dir: Path) -> dict:
    """Build data, model and trainer from the config tree (tasks.common.build_all) and train one step."""
    from storyexp.tasks.common import build_all
    from storyexp.utils import register_resolvers

    register_resolvers()
    cfg = compose_cfg([f"model={model}", "data=demo", f"trainer={trainer}", *STEP, *MODEL_OVERRIDES[model]],
                      work / model, data_dir=data_dir)
    datamodule, system, fitter = build_all(cfg)
    initial = {k: v.detach().cpu().clone() for k, v in system.state_dict().items()}
    record = RecordStep()
    fitter.callbacks.append(record)
    fitter.fit(system, datamodule=datamodule)
    assert fitter.global_step == 1, fitter.global_step
    state = {k: v.detach().cpu().clone() for k, v in system.state_dict().items()}
    return {"loss": record.loss, "ids": record.ids, "initial": initial, "state": state,
            "world_size": fitter.world_size}


def main(out: str, data_dir: str, *models: str) -> None:
    torch.set_num_threads(1)
    for model in models:
        result = one_step(model, "ddp_cpu", Path(out) / "work", Path(data_dir))
        if result["world_size"] != 2:
            raise SystemExit(f"expected 2 processes, got {result['world_size']}")
        if torch.distributed.get_rank() == 0:
            torch.save(result, Path(out) / f"{model}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
