"""What a storyexp W&B run holds, read back from the offline run's files after the task closed it (wandb.finish):
the composed config once (not Lightning's automatic model / data module hyper-parameters), name / group / tags,
checkpoints as model artifacts (logger.wandb.log_model), best/<metric> summary values and the test metrics, the test
story images and table, and the sample task's story grids -- or no run at all when nothing was sampled.

wandb 0.31 writes offline runs with wandb-core: `<run>/wandb/offline-run-*/run-<id>.wandb` (a LevelDB-format log of
`wandb.proto` Record messages: the run, config, history, summary and artifact records) and the media under
`files/media/`; it writes no config.yaml / wandb-summary.json offline, and the Python reader
`wandb.sdk.internal.datastore` is gone, so the log is read here with wandb's own protobuf classes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import yaml

from .conftest import TINY_DEMO, TINY_RUN, compose_cfg

BLOCK = 32768  # LevelDB log block size; records never straddle a block's last 6 bytes


class OfflineRun:
    """The records of one offline W&B run (its .wandb log), as plain Python values."""

    def __init__(self, run_dir: Path) -> None:
        from wandb.proto import wandb_internal_pb2 as pb

        files = list((run_dir / "wandb").glob("offline-run-*/*.wandb"))
        assert len(files) == 1, files  # one W&B run per run directory
        self.dir = files[0].parent
        self.run = None
        self.config: dict = {}
        self.summary: dict = {}
        self.history: list[dict] = []
        self.artifacts: list = []
        for data in _records(files[0].read_bytes()):
            record = pb.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                self.run = record.run
                self._apply(self.config, record.run.config.update)
            elif kind == "config":
                self._apply(self.config, record.config.update)
            elif kind == "summary":
                self._apply(self.summary, record.summary.update)
            elif kind == "history":
                row: dict = {}
                self._apply(row, record.history.item)
                self.history.append(row)
            elif kind == "artifact":
                self.artifacts.append(record.artifact)

    @staticmethod
    def _apply(target: dict, items) -> None:
        for item in items:
            path = list(item.nested_key) or [item.key]
            node = target
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = json.loads(item.value_json)


def _records(data: bytes):
    assert data[:4] == b":W&B"  # the file header: ident, magic, version (7 bytes)
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is zero padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])  # crc32c, length, FULL/FIRST/MIDDLE/LAST
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield pending
            pending = b""


def _run(overrides: list[str], tmp_path: Path, data_dir: Path, multirun: bool = False) -> tuple[dict, Path]:
    from storyexp.tasks import run_task

    cfg = compose_cfg(TINY_DEMO + TINY_RUN + overrides, tmp_path, data_dir=data_dir)
    if multirun:  # a Hydra multirun job (what launch.py -m gives each job)
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        from omegaconf import read_write

        with read_write(cfg.hydra):
            cfg.hydra.mode = RunMode.MULTIRUN
        HydraConfig().set_config(cfg)
    run_task(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
    return {"metrics": metrics, "cfg": cfg}, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data_dir):
    """One tiny train run (csv + W&B, log_model=true, two validations, a test loop with story grids and table), a
    sample run of 3 stories from its best checkpoint as a multirun job, and a sample run of no story."""
    import wandb

    tmp = tmp_path_factory.mktemp("wandb")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DATA_DIR", str(tmp / "wandb_data"))  # artifact staging, away from ~/.local/share
        train, train_out = _run(["logger=default", "logger.wandb.log_model=true", "trainer.max_epochs=2",
                                 "trainer.limit_train_batches=1", "trainer.max_steps=-1", "eval=loss_only",
                                 "eval.num_grid_stories=2", "eval.table_stories=2"], tmp / "train", shared_data_dir)
        assert wandb.run is None  # the task closed its run: what follows reads finished runs
        best = json.loads((train_out / "summary.json").read_text())["checkpoints"]["best"]
        sample, sample_out = _run(["task=sample", f"ckpt_path={best}", "logger=wandb", "sample.num_stories=3"],
                                  tmp / "sample", shared_data_dir, multirun=True)
        _, empty_out = _run(["task=sample", f"ckpt_path={best}", "logger=wandb", "sample.num_stories=0"],
                            tmp / "empty", shared_data_dir)
        assert wandb.run is None
    return {"train": (train, train_out), "sample": (sample, sample_out), "empty": empty_out, "tmp": tmp}


def test_the_config_is_logged_once_from_hydra(runs):
    """task stays `train` (the data module's `task: continuation` no longer overwrites it) in W&B and in
    csv/hparams.yaml, both hold the composed config's model / data keys, and nothing Lightning's automatic
    hyper-parameters would add (the system's constructor arguments, the data module's)."""
    train, out = runs["train"]
    cfg = train["cfg"]
    offline = OfflineRun(out)
    csv = yaml.safe_load((out / "csv" / "hparams.yaml").read_text())
    expected = {key for key in cfg if key != "hydra"} | {"params/total", "params/trainable"}
    config = {k: v for k, v in offline.config.items() if k != "_wandb"}
    for held in (config, csv):
        assert held["task"] == "train" and held["task_name"] == "train"
        assert set(held) == expected  # e.g. no top-level `network`, `path`, `frame_size`, `batch_size`
        assert held["model"]["_target_"] == cfg.model._target_
        assert held["data"]["name"] == "demo" and held["data"]["task"] == "continuation"
        assert held["params/total"] >= held["params/trainable"] > 0
    # logged once: one config record in the W&B log
    from wandb.proto import wandb_internal_pb2 as pb

    kinds = []
    for data in _records(next(offline.dir.glob("*.wandb")).read_bytes()):
        record = pb.Record()
        record.ParseFromString(data)
        kinds.append(record.WhichOneof("record_type"))
    assert kinds.count("config") == 1


def test_run_name_group_and_tags(runs):
    train = OfflineRun(runs["train"][1]).run
    assert train.display_name == "train-arldm_tiny-demo" and train.run_group == ""
    assert list(train.tags) == ["dev", "arldm_tiny", "demo"]
    assert train.job_type == "train"
    sample, out = runs["sample"]
    run = OfflineRun(out).run
    # a multirun job: named after its overrides (not the group choices), grouped by its sweep
    parts = run.display_name.split(",")
    assert "sample.num_stories=3" in parts and "task=sample" in parts and "data.batch_size=4" in parts
    assert not any(p.startswith(("model=", "logger=")) for p in parts)
    assert parts == sorted(parts, key=lambda p: p.split("=", 1)[0])
    assert run.run_group == f"multirun-{Path(sample['cfg'].hydra.sweep.dir).name}"
    assert run.job_type == "sample" and {"arldm_tiny", "demo"} <= set(run.tags)
    assert run.run_id == (out / "wandb_run_id.txt").read_text().strip()
    assert run.run_id != train.run_id  # every run directory its own W&B run


def test_log_model_records_the_checkpoints_as_model_artifacts(runs):
    """logger.wandb.log_model=true, offline: the kept checkpoints are model artifacts (the best one aliased best),
    their files staged for `wandb sync`; the sample run (log_model=false, the default) records none."""
    train, out = runs["train"]
    offline = OfflineRun(out)
    models = [a for a in offline.artifacts if a.type == "model"]
    assert models and {a.name for a in models} == {f"model-{offline.run.run_id}"}
    best = Path(json.loads((out / "summary.json").read_text())["checkpoints"]["best"])
    tagged = [a for a in models if "best" in a.aliases]
    assert len(tagged) == 1
    (entry,) = tagged[0].manifest.contents
    assert entry.path == "model.ckpt" and entry.size == best.stat().st_size
    assert Path(entry.local_path).is_file() and Path(entry.local_path).read_bytes() == best.read_bytes()
    assert Path(entry.local_path).is_relative_to(runs["tmp"] / "wandb_data")
    metadata = json.loads(tagged[0].metadata)
    assert metadata["original_filename"] == best.name and metadata["ModelCheckpoint"]["monitor"] == "val/loss"
    assert not [a for a in OfflineRun(runs["sample"][1]).artifacts if a.type == "model"]


def test_summary_holds_the_best_values_and_the_test_metrics(runs):
    train, out = runs["train"]
    offline = OfflineRun(out)
    val = [row["val/loss"] for row in offline.history if "val/loss" in row]
    assert len(val) == 2  # two validations (one per epoch)
    summary = offline.summary
    assert summary["best/val/loss"] == pytest.approx(min(val))
    assert summary["val/loss"] == pytest.approx(val[-1])  # the plain key stays the last value (W&B sweeps read it)
    metrics = train["metrics"]
    assert summary["test/loss"] == pytest.approx(metrics["test/loss"])
    # the checkpoint callback's best is the tested checkpoint's score; summary.json says it too
    assert json.loads((out / "summary.json").read_text())["best"] == {"best/val/loss": pytest.approx(min(val))}


def test_train_run_holds_the_test_story_images_and_table(runs):
    offline = OfflineRun(runs["train"][1])
    stories = offline.summary["test/stories"]
    assert stories["_type"] == "images/separated" and stories["count"] == 1
    assert (offline.dir / "files" / stories["filenames"][0]).is_file()
    table = offline.summary["test/samples"]
    assert table["_type"] == "table-file" and table["ncols"] == 4 and table["nrows"] == 2
    path = offline.dir / "files" / table["path"]
    data = json.loads(path.read_text())
    assert data["columns"] == ["story_id", "captions", "ground_truth", "generated"]
    assert [row[0] for row in data["data"]] == ["demo-test-00000", "demo-test-00001"]


def test_sample_run_logs_one_image_per_story_and_a_caption_table(runs):
    from PIL import Image

    _, out = runs["sample"]
    offline = OfflineRun(out)
    assert offline.config["task"] == "sample"  # the config, logged when the grids are
    images = offline.summary["samples/stories"]
    assert images["count"] == 3 and len(images["filenames"]) == 3
    grids = sorted((out / "samples").glob("story_*.png"))
    assert len(grids) == 3
    for name, grid in zip(sorted(images["filenames"]), grids):
        with Image.open(offline.dir / "files" / name) as logged, Image.open(grid) as written:
            assert logged.size == written.size and logged.tobytes() == written.convert(logged.mode).tobytes()
    table = json.loads((offline.dir / "files" / offline.summary["samples/table"]["path"]).read_text())
    assert table["columns"] == ["story", "story_id", "captions", "grid"]
    assert [row[:2] for row in table["data"]] == [[0, "demo-test-00000"], [1, "demo-test-00001"],
                                                  [2, "demo-test-00002"]]
    assert all(row[2].count(" | ") == 4 for row in table["data"])  # the five captions of each story


def test_a_sample_run_that_writes_no_story_starts_no_wandb_run(runs):
    out = runs["empty"]
    assert not list((out / "samples").glob("story_*.png"))
    assert not (out / "wandb").exists() or not list((out / "wandb").glob("offline-run-*"))


def test_disabled_mode_is_honoured(tmp_path, monkeypatch):
    """WANDB_MODE=disabled: no run on disk (Lightning's own offline switch would have set WANDB_MODE=dryrun over
    it); the composed logger options are the ones documented."""
    import hydra
    import wandb

    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = compose_cfg(["logger=wandb"], tmp_path)
    assert cfg.logger.wandb.log_model is False and cfg.logger.wandb.offline is True
    logger = hydra.utils.instantiate(cfg.logger.wandb)
    assert type(logger).__name__ == "WandbLogger"
    logger.log_hyperparams({"task": "train"})
    logger.log_metrics({"val/loss": 1.0}, step=0)
    assert wandb.run is None or wandb.run.disabled
    wandb.finish()
    import os

    assert os.environ["WANDB_MODE"] == "disabled"
    assert not (tmp_path / "out" / "wandb").exists()


def test_best_value_goals():
    from storyexp.callbacks.wandb_run import goal

    assert [goal(k) for k in ("val/loss", "val/fid64", "val/fid_demo", "val/char_f1_demo", "val/frame_acc",
                              "val/clip_score", "train/loss", "test/fid", "val/stories")] == \
        ["min", "min", "min", "max", "max", "max", None, None, None]
