"""task=fid_stats: compute and cache the FID reference statistics of a split (every protocol of eval.fid).

    python launch.py task=fid_stats data=pororo                       # test split, eval.fid.protocols
    python launch.py task=fid_stats data=pororo fid_stats.split=val eval.fid.protocols=[fid64,native]

The reference is the split's ground-truth target frames (continuation leaves frame 0 out) with the data module's
deterministic eval frame rule, through the Inception weights eval.fid.weights (or the look-up order); written to
eval.fid.stats_dir under a name keyed by everything it depends on (storyexp.metrics.fid_reference), as a
pytorch-fid .npz, so `python -m storyexp.metrics.fid <frames folder> <that .npz>` re-scores saved frames. A
reference that is already cached and matches is kept. Writes metrics.json (frame counts) and summary.json (paths).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from storyexp.tasks.common import build_datamodule

log = logging.getLogger("storyexp")


def run(cfg: DictConfig) -> dict[str, float]:
    from storyexp.metrics.fid import PROTOCOLS, build_inception, find_weights
    from storyexp.metrics.registry import fid_protocol
    from storyexp.metrics.fid_reference import (
        compute_reference, load_reference, recorded_frames, reference_path, reference_record, save_reference)
    from storyexp.utils.cache import plain
    from storyexp.utils.io import atomic_write_text

    fid_cfg = plain(cfg.eval.fid)
    split_kind = str(cfg.get("fid_stats", {}).get("split", "test"))
    weights = find_weights(fid_cfg.get("weights"), cfg.paths.weights_dir)  # fails before the data is read
    datamodule = build_datamodule(cfg)
    datamodule.check_available()
    datamodule.prepare_data()
    datamodule.setup("test" if split_kind == "test" else "validate")
    split = datamodule.test_split if split_kind == "test" else datamodule.val_split
    inception = None
    metrics: dict[str, float] = {}
    paths: dict[str, str] = {}
    for protocol in fid_cfg.get("protocols") or ["fid64"]:
        record = reference_record(datamodule, split, protocol, weights)
        path = reference_path(fid_cfg["stats_dir"], record)
        key = PROTOCOLS[fid_protocol(protocol)]
        if load_reference(path, record) is not None:
            log.info("%s reference of the %s split is up to date: %s", key, split, path)
            n = recorded_frames(path)
        else:
            inception = inception or build_inception(weights)
            mu, sigma, n = compute_reference(datamodule, split, protocol, inception, int(fid_cfg.get("batch_size", 50)))
            save_reference(path, mu, sigma, record, n)
            log.info("%s reference of the %s split (%d frames) written to %s", key, split, n, path)
        metrics[f"fid_stats/{key}_frames"] = float(n)
        paths[key] = str(path)
    output_dir = Path(cfg.paths.output_dir)
    atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    atomic_write_text(output_dir / "summary.json", json.dumps({"metrics": metrics, "references": paths,
                                                               "split": split}, indent=2) + "\n")
    for key, path in paths.items():
        print(f"{key} reference ({split}): {path}")
    return metrics
