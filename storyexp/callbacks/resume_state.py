"""What a resumed fit needs besides what Lightning restores: the RNG states and the training loader's position.

Every checkpoint holds the random number generators' states, so a resumed run draws what the interrupted one
would have drawn next (AR-LDM's noise and timesteps, dropout, classifier-free-guidance dropout, random frames).

Lightning restores weights, optimizer, schedulers, loops and a resumable loader's position, but not the global
RNGs. The task adds this callback to every trainer (it is not a config option). It writes
`checkpoint["rng_states"]` = `{"torch": ByteTensor, "cuda": [ByteTensor per device], "numpy": ..., "python":
...}` (tensors and plain lists only, so `torch.load(weights_only=True)` reads it) and restores them when a fit
resumes. Under DDP the checkpoint is rank 0's, so every process resumes with rank 0's states.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch

RNG_KEY = "rng_states"


def capture() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "state": [int(v) for v in state], "gauss": py_gauss},
    }


def restore(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


class ResumeState(L.Callback):
    """RNG states captured when a checkpoint is written; restored at ``on_train_start`` of a resumed fit -- after
    everything Lightning and the system set up (which may draw), right before the first batch is fetched.

    Also hands the training loader its saved position (:class:`storyexp.data.ResumableLoader`). Lightning applies
    saved loader states in ``FitLoop.setup_data`` only while restarting, but a scheduler sized from
    ``trainer.estimated_stepping_batches`` (every system's) makes it build the loader earlier, before the loops are
    restored, and the states are never applied; the pending states are applied here instead (the loader's
    iterator starts at the first batch, after this hook).
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[RNG_KEY] = capture()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get(RNG_KEY) if trainer.state.fn == "fit" else None

    def on_train_start(self, trainer, pl_module) -> None:
        loop = trainer.fit_loop
        if getattr(loop, "_combined_loader_states_to_load", None) and loop._combined_loader is not None:
            loop._combined_loader._load_state_dicts(loop._combined_loader_states_to_load)
            loop._combined_loader_states_to_load = []
        if self._pending is not None:
            restore(self._pending)
            self._pending = None
