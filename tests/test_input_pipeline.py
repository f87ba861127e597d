"""The input pipeline: frames decoded in the DataLoader workers, the HDF5 file opened by each worker itself,
persistent workers, and `data.pin_memory: auto` (pinned exactly when training runs on CUDA)."""

from __future__ import annotations

import os
import pickle
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from storyexp.data import hdf5
from storyexp.data.datamodule import StoryDataModule, StoryItems, resolve_pin_memory
from storyexp.errors import ConfigurationError

from .conftest import CONF, compose_cfg
from .data_paths import fixtures_dir

PORORO_H5 = fixtures_dir() / "h5" / "pororo.h5"  # written by AR-LDM's own converter: 6 train, 2 val stories


def _datamodule(num_workers: int, **kwargs) -> StoryDataModule:
    dm = StoryDataModule(name="pororo", path=PORORO_H5, batch_size=2, num_workers=num_workers, shuffle_seed=7,
                         frame_choice={"train": "fixed", "eval": "fixed"}, pin_memory=False, **kwargs)
    dm.setup("fit")
    return dm


def _epochs(loader, n: int = 2) -> list[dict]:
    return [batch for _ in range(n) for batch in loader]


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert set(x) == set(y)
        assert x["ids"] == y["ids"] and x["captions"] == y["captions"]
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["frame_choice"], y["frame_choice"])
        assert x["frames"].dtype == torch.uint8 and torch.equal(x["frames"], y["frames"])
        assert (x["labels"] is None) == (y["labels"] is None)
        if x["labels"] is not None:
            assert torch.equal(x["labels"], y["labels"])


def test_two_workers_yield_the_batches_of_none():
    """Same stories, same pixels, same order (the shuffled training order and the val order), two epochs each; the
    workers are persistent."""
    serial, parallel = _datamodule(0), _datamodule(2)
    train0, train2 = serial.train_dataloader(), parallel.train_dataloader()
    assert not train0.persistent_workers and train2.persistent_workers and train2.num_workers == 2
    order = [i for b in _epochs(train0, 1) for i in b["index"].tolist()]
    assert sorted(order) == list(range(6)) and order != sorted(order)  # shuffled: the order itself is compared
    _assert_same_batches(_epochs(train0), _epochs(train2))
    _assert_same_batches(_epochs(serial.val_dataloader(), 1), _epochs(parallel.val_dataloader(), 1))


class _Where(StoryItems):
    """A story item that also says which process read it and which process opened the reader's file handle."""

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        return {"id": item["id"], "frame": item["frames"][0], "pid": os.getpid(),
                "handle_pid": self.stories.handle_pid}


def _as_list(items: list[dict]) -> list[dict]:
    return items


def test_decoding_and_the_file_handle_belong_to_the_worker(monkeypatch):
    """PNG bytes are decoded in `__getitem__` in the worker (never in the main process), and a worker forked after
    the main process read a story opens its own HDF5 handle instead of reading through the inherited one."""
    dm = _datamodule(0)
    stories = dm.datasets["train"].stories
    assert isinstance(stories, hdf5.HDF5Stories)
    main = os.getpid()
    expected = {story.id: story.frames[0] for story in (stories[i] for i in range(len(stories)))}
    assert stories.handle_pid == main  # the main process has read: its handle is open when the workers fork

    copy = pickle.loads(pickle.dumps(dm.datasets["train"]))  # the dataset pickles without a handle
    assert copy.stories.handle_pid is None and copy.stories._handle is None

    decode = hdf5.decode_png

    def decode_outside_main(data):
        if os.getpid() == main:
            raise AssertionError("a frame was decoded in the main process")
        return decode(data)

    monkeypatch.setattr(hdf5, "decode_png", decode_outside_main)  # forked workers inherit the patch
    loader = DataLoader(_Where(stories), batch_size=2, num_workers=2, multiprocessing_context="fork",
                        collate_fn=_as_list)
    items = [item for batch in loader for item in batch]
    assert len(items) == len(stories)
    workers = {item["pid"] for item in items}
    assert main not in workers and 1 <= len(workers) <= 2
    assert all(item["handle_pid"] == item["pid"] for item in items)  # opened in the worker that read
    for item in items:  # decoded RGB frames, as the main process reads them
        assert item["frame"].dtype == np.uint8 and np.array_equal(item["frame"], expected[item["id"]])
    monkeypatch.setattr(hdf5, "decode_png", decode)
    assert stories.handle_pid == main and np.array_equal(stories[0].frames[0], expected[stories[0].id])


# ------------------------------------------------------------------------------------------------ pin_memory


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "data").glob("*.yaml")))
def test_data_configs_default_to_pin_memory_auto(name, tmp_path):
    cfg = compose_cfg([f"data={name}"], tmp_path)
    assert cfg.data.pin_memory == "auto"


def test_pin_memory_auto_follows_cuda(tmp_path, shared_data_dir):
    """auto: False on this CPU machine, True once CUDA is (mocked) available; with a trainer attached, True exactly
    when its accelerator is CUDA. true / false pass through."""
    import hydra
    import lightning as L
    from lightning.pytorch.accelerators import CUDAAccelerator

    cfg = compose_cfg(["data.demo.n_train=8", "data.demo.n_val=2", "data.demo.n_test=2", "data.demo.resolution=32",
                       "data.batch_size=2"], tmp_path, data_dir=shared_data_dir)
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    assert dm.pin_memory == "auto"
    dm.setup("fit")
    with mock.patch.object(torch.cuda, "is_available", return_value=False):
        assert dm.loader_pin_memory is False and dm.train_dataloader().pin_memory is False
        assert dm.val_dataloader().pin_memory is False
    with mock.patch.object(torch.cuda, "is_available", return_value=True):
        assert dm.loader_pin_memory is True
        assert dm.train_dataloader().pin_memory is True and dm.val_dataloader().pin_memory is True
        dm.trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False)
        assert dm.loader_pin_memory is False  # a CPU run on a GPU machine pins nothing
        assert resolve_pin_memory("auto", SimpleNamespace(accelerator=CUDAAccelerator())) is True
        assert resolve_pin_memory(False, SimpleNamespace(accelerator=CUDAAccelerator())) is False
    dm.trainer = None
    assert resolve_pin_memory(True) is True and resolve_pin_memory(False) is False
    for value in (True, False):
        forced = compose_cfg([f"data.pin_memory={str(value).lower()}"], tmp_path)
        assert forced.data.pin_memory is value
        assert StoryDataModule(name="pororo", path=PORORO_H5, pin_memory=forced.data.pin_memory).loader_pin_memory \
            is value


def test_a_bad_pin_memory_is_one_line_naming_the_key():
    with pytest.raises(ConfigurationError, match=r"data\.pin_memory='sometimes' is not valid.*auto, true, false"):
        StoryDataModule(name="pororo", path=PORORO_H5, pin_memory="sometimes")
