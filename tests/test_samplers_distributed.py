"""Under DDP every val/test/predict story is scored exactly once (no padded shards); training keeps the padded
DistributedSampler. Runs in one process: the sampler takes explicit num_replicas/rank, and torch.distributed's
state is monkeypatched for the data module."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from storyexp.data import StoryDataModule, ensure_demo_dataset, generate_demo_stories
from storyexp.data.datamodule import ResumableSampler, UnpaddedDistributedSampler, eval_shard
from storyexp.errors import ConfigurationError

DEMO_KW = dict(seed=3, n_train=6, n_val=5, n_test=7, resolution=16)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("n", range(1, 10))
def test_shards_cover_every_index_exactly_once(world_size, n):
    data = list(range(n))
    shards = [list(UnpaddedDistributedSampler(data, num_replicas=world_size, rank=r)) for r in range(world_size)]
    union = [i for shard in shards for i in shard]
    assert sorted(union) == list(range(n)) and len(set(union)) == len(union)
    assert [len(UnpaddedDistributedSampler(data, num_replicas=world_size, rank=r)) for r in range(world_size)] == [
        len(s) for s in shards
    ]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shards == [data[r::world_size] for r in range(world_size)]  # in order within a shard
    if n % world_size:  # what it replaces: torch's sampler pads the last shard with repeated indices
        padded = [i for r in range(world_size) for i in DistributedSampler(data, world_size, r, shuffle=False)]
        assert len(padded) > n


def test_lightning_keeps_the_loaders_sampler():
    """lightning/pytorch/trainer/connectors/data_connector.py: `_requires_distributed_sampler` is False for a
    loader whose sampler is a DistributedSampler, so Lightning injects none (test/val), and for predict it
    rebuilds the loader around the same sampler."""
    from lightning.pytorch.trainer.states import RunningStage

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    data = list(range(5))
    ours = DataLoader(data, batch_size=2, sampler=UnpaddedDistributedSampler(data, num_replicas=2, rank=1))
    connector = trainer._data_connector
    assert connector._requires_distributed_sampler(DataLoader(data, batch_size=2))  # a plain loader: injected
    assert not connector._requires_distributed_sampler(ours)
    assert connector._prepare_dataloader(ours, shuffle=False, mode=RunningStage.TESTING) is ours
    predict = connector._prepare_dataloader(ours, shuffle=False, mode=RunningStage.PREDICTING)
    assert [b.tolist() for b in predict] == [[1, 3]]


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    return ensure_demo_dataset(tmp_path_factory.mktemp("demo") / "demo.h5", **DEMO_KW)


def _fake_distributed(monkeypatch, world_size: int, rank: int) -> None:
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: world_size)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: rank)


def _dm(demo_file, **kw) -> StoryDataModule:
    return StoryDataModule(name="demo", path=demo_file, batch_size=2, demo=DEMO_KW, **kw)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_datamodule_eval_loaders_score_each_story_once(demo_file, monkeypatch, world_size):
    stories = generate_demo_stories(**DEMO_KW)
    seen = {"val": [], "test": [], "predict": []}
    for rank in range(world_size):
        _fake_distributed(monkeypatch, world_size, rank)
        assert eval_shard() == (world_size, rank)
        dm = _dm(demo_file)
        dm.setup()
        loaders = {"val": dm.val_dataloader(), "test": dm.test_dataloader(), "predict": dm.predict_dataloader()}
        for key, loader in loaders.items():
            assert isinstance(loader.sampler, UnpaddedDistributedSampler)
            assert (loader.sampler.num_replicas, loader.sampler.rank) == (world_size, rank)
            for batch in loader:  # the batch contract: dataset indices and the story ids at them
                split = "val" if key == "val" else "test"
                assert batch["ids"] == [stories[split][i].id for i in batch["index"].tolist()]
                seen[key] += batch["index"].tolist()
        train = dm.train_dataloader()  # training: shuffled, padded shards (DistributedSampler's rule), resumable
        assert isinstance(train.sampler, ResumableSampler)
        assert (train.sampler.num_replicas, train.sampler.rank) == (world_size, rank)
        seen["train"] = seen.get("train", []) + list(train.sampler)
    assert set(seen["train"]) == set(range(DEMO_KW["n_train"]))  # every training story in some shard
    assert sorted(seen["val"]) == list(range(DEMO_KW["n_val"]))
    assert sorted(seen["test"]) == sorted(seen["predict"]) == list(range(DEMO_KW["n_test"]))


def test_datamodule_without_process_group_is_unsharded(demo_file, monkeypatch):
    assert eval_shard() is None  # no process group in the test process
    _fake_distributed(monkeypatch, 1, 0)
    assert eval_shard() is None  # a group of one
    dm = _dm(demo_file)
    dm.setup("test")
    loader = dm.test_dataloader()
    assert isinstance(loader.sampler, SequentialSampler)
    assert [i for b in loader for i in b["index"].tolist()] == list(range(DEMO_KW["n_test"]))


def test_fewer_stories_than_processes_is_refused(demo_file, monkeypatch):
    _fake_distributed(monkeypatch, 4, 0)
    dm = _dm(demo_file, limit_test=3)
    dm.setup("test")
    with pytest.raises(ConfigurationError, match=r"'test' split has 3 stories but 4 processes"):
        dm.test_dataloader()
