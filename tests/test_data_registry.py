"""The one dataset registry (storyexp.data.registry): a dataset is a reader module plus a yaml.

A tiny dataset is declared here the way a reader module declares one (a reader and `register(DatasetSpec(...))`)
and a data yaml is written for it; nothing else is touched, and it opens through `open_split`, `load_stories`,
the converter and the data module like the built-in datasets.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from storyexp import CONFIG_DIR
from storyexp.data import HDF5Stories, Story, StoryDataModule, load_stories, open_split, write_stories_hdf5
from storyexp.data.convert import convert
from storyexp.data.registry import DatasetSpec, get_dataset, known_datasets, register, unregister
from storyexp.errors import ConfigurationError, StoryexpError
from tests.data_paths import fixtures_dir

FIXTURES = fixtures_dir()
REPO = Path(__file__).resolve().parents[1]
BUILTIN = ("demo", "pororo", "flintstones", "ssid")


# ----------------------------------------------------------------- "file one": a reader module for `tinyset`
#
# raw layout: <root>/tinyset.json = {"train": [[5 captions], ...], "val": [...], "test": [...]}; frame j of
# story i is a flat 8x8 image of grey level 10*i + j.

TINY_FILE = "tinyset.json"


class TinyRawStories(Sequence):
    def __init__(self, root: Path, split: str) -> None:
        self.root, self.split = Path(root), split
        self.captions = json.loads((self.root / TINY_FILE).read_text())[split]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> Story:  # type: ignore[override]
        if not 0 <= i < len(self):
            raise IndexError(i)
        frames = [np.full((8, 8, 3), 10 * i + j, dtype=np.uint8) for j in range(5)]
        labels = np.eye(5, 2, dtype=np.float32)
        return Story(id=f"tiny-{self.split}-{i}", captions=list(self.captions[i]), frames=frames, labels=labels)


def is_tiny_raw(path: Path) -> bool:
    return (Path(path) / TINY_FILE).is_file()


TINY_SPEC = DatasetSpec(
    name="tinyset",
    title="TinySet",
    open_raw=lambda root, split, frame_choice="fixed": TinyRawStories(root, split),
    is_raw=is_tiny_raw,
    characters=("ann", "bob"),
    download="Write tinyset.json (tests/test_data_registry.py)",
)

# ------------------------------------------------------------------------- "file two": storyexp/conf/data/tinyset.yaml

TINY_YAML = """\
_target_: storyexp.data.StoryDataModule
name: tinyset
path: {path}
task: visualization
characters: [ann, bob]
batch_size: 2
num_workers: 0
"""


@pytest.fixture()
def tinyset(tmp_path):
    """A registered `tinyset` and its raw folder (unregistered afterwards)."""
    root = tmp_path / "tiny_raw"
    root.mkdir()
    splits = {split: [[f"{split} story {i} frame {j}." for j in range(5)] for i in range(n)]
              for split, n in (("train", 3), ("val", 2), ("test", 5))}
    (root / TINY_FILE).write_text(json.dumps(splits))
    register(TINY_SPEC)
    yield root
    unregister("tinyset")


def test_registering_is_the_only_step_a_new_dataset_needs(tinyset, tmp_path):
    assert "tinyset" in known_datasets() and known_datasets()[:4] == BUILTIN
    raw = open_split("tinyset", tinyset, "test")
    assert isinstance(raw, TinyRawStories) and [s.id for s in raw] == [f"tiny-test-{i}" for i in range(5)]
    assert load_stories("tinyset", tinyset, "val")[1].captions[4] == "val story 1 frame 4."

    out = tmp_path / "tiny.h5"
    report = convert("tinyset", tinyset, out, progress=False)
    assert {k: v["written"] for k, v in report["splits"].items()} == {"train": 3, "val": 2, "test": 5}
    converted = open_split("tinyset", out, "test")
    assert isinstance(converted, HDF5Stories) and converted.characters == ["ann", "bob"]
    assert converted.attrs["dataset"] == "tinyset" and converted.text_key == "text"
    assert list(converted) == list(raw)

    for path in (tinyset, out):  # the yaml, instantiated as Hydra does: raw folder or converted file
        yaml = tmp_path / "tinyset.yaml"
        yaml.write_text(TINY_YAML.format(path=path))
        dm = hydra.utils.instantiate(OmegaConf.load(yaml), _convert_="all")
        dm.check_available()
        dm.setup("test")
        batches = list(dm.test_dataloader())
        assert [i for b in batches for i in b["index"].tolist()] == list(range(5))
        assert [i for b in batches for i in b["ids"]] == [f"tiny-test-{i}" for i in range(5)]
        assert batches[0]["frames"].shape == (2, 5, 8, 8, 3) and batches[0]["labels"].shape == (2, 5, 2)
        assert int(batches[-1]["frames"][0, 3, 0, 0, 0]) == 43  # story 4, frame 3
    unregister("tinyset")
    with pytest.raises(ConfigurationError, match="unknown dataset 'tinyset'"):
        open_split("tinyset", out, "test")


def test_register_refuses_a_second_spec_under_a_taken_name(tinyset):
    register(TINY_SPEC)  # the same spec again (a module imported twice): nothing happens
    other = DatasetSpec(name="tinyset", open_raw=TINY_SPEC.open_raw)
    with pytest.raises(ConfigurationError, match="'tinyset' is already registered"):
        register(other)
    assert get_dataset("tinyset") is TINY_SPEC
    register(other, replace=True)
    assert get_dataset("tinyset") is other


def test_builtin_specs():
    assert known_datasets()[:4] == BUILTIN
    pororo, flintstones, ssid, demo = (get_dataset(n) for n in ("pororo", "flintstones", "ssid", "demo"))
    assert (pororo.frame_height, flintstones.frame_height, ssid.frame_height, demo.frame_height) == (128, 128, None, None)
    assert (pororo.text_key, flintstones.text_key, ssid.text_key) == ("text", "text", "ssid")
    assert len(pororo.characters) == 9 and len(flintstones.characters) == 7 and ssid.characters == ()
    assert demo.generator is not None and not demo.convertible and pororo.generator is None
    for name in ("pororo", "flintstones", "ssid"):
        assert get_dataset(name).looks_like_raw(FIXTURES / "raw" / name)
        others = [n for n in ("pororo", "flintstones", "ssid") if n != name]
        assert not any(get_dataset(o).looks_like_raw(FIXTURES / "raw" / name) for o in others)
    # the storyexp/conf/data yaml of every built-in dataset lists the spec's label order
    for name in BUILTIN:
        cfg = OmegaConf.load(CONFIG_DIR / "data" / f"{name}.yaml")
        assert cfg.name == name and tuple(cfg.characters) == get_dataset(name).characters


def _one_line(err: BaseException) -> str:
    msg = str(err)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("entry", ["get_dataset", "open_split", "load_stories", "datamodule", "convert"])
def test_unknown_name_is_one_line_listing_the_known(entry, tmp_path):
    calls = {
        "get_dataset": lambda: get_dataset("vist"),
        "open_split": lambda: open_split("vist", tmp_path, "train"),
        "load_stories": lambda: load_stories("vist", tmp_path),
        "datamodule": lambda: StoryDataModule(name="vist", path=tmp_path),
        "convert": lambda: convert("vist", tmp_path, tmp_path / "x.h5", progress=False),
    }
    with pytest.raises(ConfigurationError) as e:
        calls[entry]()
    assert isinstance(e.value, StoryexpError)
    assert _one_line(e.value) == "unknown dataset 'vist'; known datasets: demo, pororo, flintstones, ssid"
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("configured,folder", [("pororo", "flintstones"), ("flintstones", "ssid"), ("ssid", "pororo")])
def test_raw_folder_of_another_dataset_is_a_clear_error(configured, folder, tmp_path):
    root = FIXTURES / "raw" / folder
    for call in (lambda: open_split(configured, root, "val"),
                 lambda: StoryDataModule(name=configured, path=root).check_available(),
                 lambda: convert(configured, root, tmp_path / "x.h5", progress=False)):
        with pytest.raises(ConfigurationError) as e:
            call()
        msg = _one_line(e.value)
        assert str(root) in msg and f"raw folder of the {folder} dataset" in msg and f"data={folder}" in msg
        assert f"configured dataset is {configured!r}" in msg
    assert not (tmp_path / "x.h5").exists()
    # a folder of no known layout still gets the reader's own message (which files it expects)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        open_split(configured, tmp_path, "val")


def test_hdf5_file_of_another_dataset_is_a_clear_error(tmp_path):
    story = Story("s0", [f"c{j}" for j in range(5)], [np.zeros((4, 4, 3), np.uint8)] * 5)
    p = write_stories_hdf5(tmp_path / "p.h5", {"train": [story]}, attrs={"dataset": "pororo"})
    assert len(open_split("pororo", p, "train")) == 1
    with pytest.raises(ConfigurationError) as e:
        open_split("flintstones", p, "train")
    assert str(p) in _one_line(e.value) and "HDF5 file of the pororo dataset" in str(e.value)
    # files without the attribute (AR-LDM's own) are read as the configured dataset
    assert len(open_split("flintstones", FIXTURES / "h5" / "pororo.h5", "val")) > 0


def test_generated_dataset_has_no_raw_folder(tmp_path):
    with pytest.raises(ConfigurationError, match="demo dataset is read from an HDF5 file.*directory"):
        open_split("demo", tmp_path, "train")
    with pytest.raises(ConfigurationError, match="demo dataset has no raw layout"):
        convert("demo", tmp_path, tmp_path / "x.h5", progress=False)


def test_no_dispatch_on_dataset_names():
    """The shared modules look datasets up in the registry: no built-in name appears in them."""
    for module in ("sources.py", "convert.py", "datamodule.py", "registry.py"):
        text = (REPO / "storyexp" / "data" / module).read_text()
        code = re.sub(r'"""(.|\n)*?"""|#.*', "", text)  # docstrings and comments may name datasets
        found = re.findall(r"""["'](demo|pororo|flintstones|ssid)["'](?!\s*:)""", code)  # (a dict key is a config key)
        assert not found, (module, found)


def test_spec_lookup_survives_pickling_the_datamodule(tmp_path):
    import pickle

    dm = StoryDataModule(name="pororo", path=FIXTURES / "h5" / "pororo.h5", batch_size=2)
    clone = pickle.loads(pickle.dumps(dm))
    assert clone.spec is get_dataset("pororo")
    clone.setup("test")
    assert next(iter(clone.test_dataloader()))["frames"].dtype == torch.uint8
