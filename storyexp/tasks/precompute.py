"""task=precompute: the frozen encoders' outputs for every candidate frame of the training split, computed once.

    python launch.py task=precompute model=mindalle data=pororo                # stage-1 VQGAN codes
    python launch.py task=precompute model=arldm data=flintstones precompute.device=cuda   # VAE mean / std
    python launch.py task=train model=mindalle data=pororo data.precompute=true          # training reuses it

What is cached, the file layout and its key: `storyexp.systems.frozen_inputs` and `storyexp.data.precomputed`.
The file goes to ``data.precompute_path`` when set, else to ``data.precompute_dir/<system>_<key>.h5`` (with
``data.limit_train`` set: into this run's output folder, as every limited run does). A matching file is kept
(``precompute.force=true`` recomputes it); a stale default file is recomputed; an explicit stale one is refused.

Options: ``precompute.device`` auto | cpu | cuda, ``precompute.force``. The model is built as training builds it
(a demo stage 1 fitted on the training split first, `prepare_frozen`; ``trainer.precision=*-true`` casts it), so
the key is the one training computes. Writes ``<output_dir>/precompute.json``; returns ``precompute/stories``,
``precompute/rows`` (candidate frames), ``precompute/bytes``, ``precompute/seconds``, ``precompute/computed``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import h5py
import torch
from omegaconf import DictConfig

from storyexp.errors import ConfigurationError
from storyexp.systems.frozen_inputs import ensure_precomputed
from storyexp.tasks.benchmark import resolve_device
from storyexp.tasks.common import build_data_and_model
from storyexp.utils.io import atomic_write_text

log = logging.getLogger("storyexp")

TRUE_PRECISIONS = {"16-true": torch.float16, "bf16-true": torch.bfloat16, "64-true": torch.float64}


def prepare(cfg: DictConfig, datamodule, model, device: torch.device) -> None:
    """Data set up, and the model on `device` in training's precision with its frozen parts as training has them."""
    if not callable(getattr(model, "frozen_inputs", None)):
        raise ConfigurationError(f"model {cfg.model.get('_target_')} has no frozen inputs to precompute "
                                 "(it implements no frozen_inputs): use data.precompute=false")
    datamodule.prepare_data()
    datamodule.setup("fit")
    prepare_frozen = getattr(model, "prepare_frozen", None)
    if callable(prepare_frozen):
        prepare_frozen(datamodule, cfg.paths.output_dir)
    dtype = TRUE_PRECISIONS.get(str(cfg.trainer.get("precision", "32-true")))
    model.to(device)
    if dtype is not None:  # Lightning's *-true precision casts the whole module the same way
        model.to(dtype)


def run(cfg: DictConfig) -> dict[str, float]:
    opts = cfg.get("precompute") or {}
    datamodule, model = build_data_and_model(cfg)
    prepare(cfg, datamodule, model, resolve_device(str(opts.get("device", "auto"))))
    start = time.perf_counter()
    path, computed = ensure_precomputed(model, datamodule, cfg.paths.output_dir, force=bool(opts.get("force", False)))
    seconds = time.perf_counter() - start
    with h5py.File(path, "r") as f:
        stories, rows = int(f["ids"].shape[0]), int(f["n_candidates"][()].sum())
    results = {"precompute/stories": float(stories), "precompute/rows": float(rows),
               "precompute/bytes": float(path.stat().st_size), "precompute/seconds": seconds,
               "precompute/computed": float(computed)}
    out = Path(cfg.paths.output_dir) / "precompute.json"
    atomic_write_text(out, json.dumps({"results": results, "file": str(path)}, indent=2))
    verb = "computed" if computed else "up to date, kept"
    log.info("precomputed inputs %s: %s (%d stories, %d candidate frames, %.1f MiB)", verb, path, stories, rows,
             path.stat().st_size / 2**20)
    return results
