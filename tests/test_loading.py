"""The one loader (`storyexp.utils.loading.load_file`) and the one strict check (`check_state_dict`).

Every file a user hands in (checkpoints, original weights) is read through `load_file`: a pickle that would run
code is refused before any of it runs, damaged or foreign files give one line naming the file, and every model
loader (VQGAN, minDALL-E stage 2, AR-LDM, BLIP, min-dalle) goes through it. Every strict key / shape check raises
the one `CheckpointMismatchError`, one line long.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file

from storyexp.errors import MissingResourceError, StoryexpError
from storyexp.models.arldm import build_arldm_from_sizes, load_blip_checkpoint, load_original_arldm_checkpoint
from storyexp.models.mega import MegaDalle
from storyexp.models.mega.loading import read_state_dict
from storyexp.models.mindalle import Stage2Config, Transformer1d
from storyexp.models.vqgan import VQGAN, VQGANConfig
from storyexp.utils.loading import (
    CheckpointMismatchError,
    StoryexpCheckpointIO,
    UnreadableFileError,
    UnsafeFileError,
    check_state_dict,
    load_file,
)
from tests.data_paths import parity_dir

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on protocol-4 pickles


# ------------------------------------------------------------------------------------------------ crafted files
class TouchMarker:
    """Unpickling this calls `pathlib.Path.touch(marker)`: creates the marker file (the code a checkpoint could run)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


class ShellMarker:
    """Unpickling this runs `os.system("touch <marker>")`."""

    def __init__(self, marker: pathlib.Path):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


# format -> how the payload is written; every one is a way a real checkpoint file can be laid out
WRITERS = {
    "torch zip": lambda obj, path: torch.save(obj, path),
    "torch legacy": lambda obj, path: torch.save(obj, path, _use_new_zipfile_serialization=False),
    "pickle protocol 2": lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=2)),
    "pickle protocol 4": lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=4)),
}
PAYLOADS = {"Path.touch": (TouchMarker, "pathlib"), "os.system": (ShellMarker, "system")}


def write_evil(path: pathlib.Path, marker: pathlib.Path, fmt: str = "torch zip", payload: str = "Path.touch"):
    """A checkpoint-shaped file (`{'state_dict': {...}}`) one of whose values is the code-running payload."""
    cls, _ = PAYLOADS[payload]
    WRITERS[fmt]({"state_dict": {"weight": torch.zeros(2), "bias": cls(marker)}}, path)
    return path


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_code_running_pickle_is_refused_before_it_runs(tmp_path, fmt, payload):
    # control: the crafted file really runs its code when unpickled the unsafe way (else the test would prove nothing)
    control_marker = tmp_path / "control_marker"
    control = write_evil(tmp_path / "control.pt", control_marker, fmt, payload)
    torch.load(control, weights_only=False) if fmt.startswith("torch") else pickle.loads(control.read_bytes())
    assert control_marker.exists()

    marker = tmp_path / "marker"
    path = write_evil(tmp_path / "evil.ckpt", marker, fmt, payload)
    with pytest.raises(UnsafeFileError) as err:
        load_file(path, "Checkpoint (ckpt_path)")
    message = str(err.value)
    assert not marker.exists()
    assert isinstance(err.value, StoryexpError)
    assert "\n" not in message
    assert str(path) in message and "Checkpoint (ckpt_path)" in message
    assert PAYLOADS[payload][1] in message, message  # the global it would have imported is named
    assert "refused" in message and "safetensors" in message  # what happened and the fix


@pytest.fixture(scope="module")
def tiny_vqgan_config() -> VQGANConfig:
    return VQGANConfig.from_dict({
        "embed_dim": 8, "n_embed": 32,
        "hparams": {"resolution": 16, "ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1, "attn_resolutions": [8],
                    "z_channels": 8},
    })


@pytest.fixture(scope="module")
def tiny_stage2_config() -> Stage2Config:
    return Stage2Config(vocab_size_txt=40, vocab_size_img=32, embed_dim=32, n_layers=2, n_heads=4, n_dense_layers=2,
                        ctx_len_img=6, ctx_len_txt=8)


@pytest.fixture(scope="module")
def tiny_arldm():
    return build_arldm_from_sizes(["a", "red", "ball"], max_length=8, n_frames=2).model


def _every_loader(tiny_vqgan_config, tiny_stage2_config, tiny_arldm, tmp_path):
    """Each user-facing loader, as a function of the path it is handed."""
    def mega_folder(path):  # min-dalle's folder with the crafted file as encoder.pt
        folder = tmp_path / "mega"
        folder.mkdir(exist_ok=True)
        for name in ("decoder.pt", "detoker.pt", "vocab.json", "merges.txt"):
            if not (folder / name).exists():
                (folder / name).symlink_to(parity_dir() / "mega" / name)
        shutil.copyfile(path, folder / "encoder.pt")
        return MegaDalle.from_pretrained(folder)

    return {
        "VQGAN.from_ckpt": lambda p: VQGAN.from_ckpt(p, tiny_vqgan_config),
        "Transformer1d.load_checkpoint": lambda p: Transformer1d(tiny_stage2_config).load_checkpoint(p),
        "Transformer1d.from_ckpt": lambda p: Transformer1d.from_ckpt(tiny_stage2_config, p),
        "load_original_arldm_checkpoint": lambda p: load_original_arldm_checkpoint(tiny_arldm, p),
        "load_blip_checkpoint": load_blip_checkpoint,
        "mega read_state_dict": read_state_dict,
        "MegaDalle.from_pretrained": mega_folder,
        "StoryexpCheckpointIO": lambda p: StoryexpCheckpointIO().load_checkpoint(p),
    }


LOADERS = ["VQGAN.from_ckpt", "Transformer1d.load_checkpoint", "Transformer1d.from_ckpt",
           "load_original_arldm_checkpoint", "load_blip_checkpoint", "mega read_state_dict",
           "MegaDalle.from_pretrained", "StoryexpCheckpointIO"]


@pytest.mark.parametrize("loader", LOADERS)
def test_every_model_loader_refuses_the_crafted_file(tmp_path, loader, tiny_vqgan_config, tiny_stage2_config,
                                                     tiny_arldm):
    load = _every_loader(tiny_vqgan_config, tiny_stage2_config, tiny_arldm, tmp_path)[loader]
    for fmt in ("torch zip", "pickle protocol 4"):
        marker = tmp_path / f"marker {fmt}"
        path = write_evil(tmp_path / f"evil {fmt}.pt", marker, fmt)
        with pytest.raises(UnsafeFileError) as err:
            load(path)
        assert not marker.exists(), (loader, fmt)
        named = tmp_path / "mega" / "encoder.pt" if loader == "MegaDalle.from_pretrained" else path
        assert "\n" not in str(err.value) and str(named) in str(err.value) and "pathlib" in str(err.value)


# ------------------------------------------------------------------------------------------------ unreadable
def _passwd(path):
    path.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n")


def _truncated_zip(path):
    torch.save({"state_dict": {"w": torch.arange(1000.0)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _truncated_legacy(path):
    torch.save({"w": torch.arange(1000.0)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path):
    path.write_bytes(b"")


def _random_bytes(path):
    path.write_bytes(bytes((i * 97 + 13) % 256 for i in range(512)))


DAMAGED = {"passwd text": _passwd, "truncated torch zip": _truncated_zip, "truncated legacy torch": _truncated_legacy,
           "empty": _empty, "random bytes": _random_bytes}


@pytest.mark.parametrize("kind", sorted(DAMAGED))
def test_damaged_or_foreign_files_give_one_line(tmp_path, kind, tiny_vqgan_config):
    path = tmp_path / "weights.ckpt"
    DAMAGED[kind](path)
    with pytest.raises(UnreadableFileError) as err:
        load_file(path, "VQGAN checkpoint")
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "VQGAN checkpoint" in message
    assert isinstance(err.value, StoryexpError)
    with pytest.raises(UnreadableFileError, match="VQGAN checkpoint") as err:  # through a model loader too
        VQGAN.from_ckpt(path, tiny_vqgan_config)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_etc_passwd_itself(tiny_vqgan_config):
    passwd = pathlib.Path("/etc/passwd")
    if not passwd.is_file():  # every Linux has it; the copy above covers the content otherwise
        passwd = pathlib.Path(__file__)
    with pytest.raises(UnreadableFileError) as err:
        VQGAN.from_ckpt(passwd, tiny_vqgan_config)
    assert "\n" not in str(err.value) and str(passwd) in str(err.value)


def test_missing_file_names_the_path_and_how_to_get_it(tmp_path, tiny_vqgan_config, tiny_stage2_config):
    path = tmp_path / "nowhere" / "stage1_last.ckpt"
    with pytest.raises(MissingResourceError) as err:
        load_file(path, "VQGAN checkpoint", how_to_get="Download it from X.")
    assert str(err.value) == f"VQGAN checkpoint not found at '{path}'. Download it from X."
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, StoryexpError)
    with pytest.raises(MissingResourceError, match="stage1_last.ckpt") as err:
        VQGAN.from_ckpt(path, tiny_vqgan_config)
    assert str(path) in str(err.value)
    with pytest.raises(MissingResourceError, match="stage2_last.ckpt"):
        Transformer1d.from_ckpt(tiny_stage2_config, tmp_path / "missing.ckpt")
    with pytest.raises(MissingResourceError, match="model_large.pth"):
        load_blip_checkpoint(tmp_path / "model_large.pth")


def test_non_checkpoint_content_is_named(tmp_path, tiny_vqgan_config):
    flat = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], flat)
    with pytest.raises(UnreadableFileError, match="flat dict of tensors") as err:
        read_state_dict(flat)
    assert "\n" not in str(err.value) and str(flat) in str(err.value)
    with pytest.raises(UnreadableFileError, match="not a state dict"):
        VQGAN.from_ckpt(flat, tiny_vqgan_config)
    with pytest.raises(UnreadableFileError, match="not a BLIP checkpoint"):
        load_blip_checkpoint(flat)


# ------------------------------------------------------------------------------------------------ safetensors
def test_safetensors_round_trip(tmp_path, tiny_vqgan_config):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "c.d": torch.ones(2, dtype=torch.float16)}
    path = tmp_path / "weights.safetensors"
    save_file(tensors, str(path))
    loaded = load_file(path, "Weights")
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key

    # a model loader takes a safetensors state dict as well
    model = VQGAN(tiny_vqgan_config)
    path = tmp_path / "vqgan.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    again = VQGAN.from_ckpt(path, tiny_vqgan_config)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


@pytest.mark.parametrize("damage", ["truncated", "garbage header", "empty"])
def test_damaged_safetensors_is_unreadable(tmp_path, damage):
    path = tmp_path / "weights.safetensors"
    save_file({"a": torch.randn(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage header": b"\xff" * 8 + data[8:],
                      "empty": b""}[damage])
    with pytest.raises(UnreadableFileError) as err:
        load_file(path, "Weights")
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "safetensors" in message


# ------------------------------------------------------------------------------------------------ check_state_dict
def _target():
    return {f"layer.{i}.weight": torch.zeros(2, 2) for i in range(8)} | {"head.bias": torch.zeros(3)}


def test_check_state_dict_passes_silently_on_an_exact_match():
    target = _target()
    check_state_dict(target, {k: torch.ones_like(v) for k, v in target.items()}, "Checkpoint x.ckpt")


def test_check_state_dict_lists_counts_and_first_keys_on_one_line():
    target = _target()
    state = {k: v for k, v in target.items() if not k.startswith("layer.")}  # 8 missing
    state.update({"extra.a": torch.zeros(1), "extra.b": torch.zeros(1)})  # 2 unexpected
    state["head.bias"] = torch.zeros(4)  # 1 shape mismatch
    with pytest.raises(CheckpointMismatchError) as err:
        check_state_dict(target, state, "Checkpoint /runs/x.ckpt")
    message = str(err.value)
    assert "\n" not in message
    assert isinstance(err.value, StoryexpError) and isinstance(err.value, RuntimeError)
    assert message.startswith("Checkpoint /runs/x.ckpt does not fit the model: ")
    assert "missing keys (8): layer.0.weight, layer.1.weight, layer.2.weight, layer.3.weight, layer.4.weight, ..." \
        in message
    assert "layer.5.weight" not in message  # only the first ones; the count says how many
    assert "unexpected keys (2): extra.a, extra.b;" in message
    assert "shape mismatches (1): head.bias (file (4,) vs model (3,))" in message
    assert message.endswith(".") and "use the file that belongs to the configured model" in message

    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(2\): .*; run the matching config\.$"):
        check_state_dict(target, state, "Checkpoint", hint="run the matching config")


def test_check_state_dict_ignore_missing_and_unexpected():
    target = _target()
    state = {k: v for k, v in target.items() if k != "head.bias"}
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): head\.bias"):
        check_state_dict(target, state, "Checkpoint")
    check_state_dict(target, state, "Checkpoint", ignore_missing=lambda key: key.startswith("head."))
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): layer\.0\.weight"):
        check_state_dict(target, {k: v for k, v in state.items() if k != "layer.0.weight"}, "Checkpoint",
                         ignore_missing=lambda key: key.startswith("head."))  # only the excused keys

    with_extra = dict(target, **{"loss.disc.weight": torch.zeros(1)})
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(1\): loss\.disc\.weight"):
        check_state_dict(target, with_extra, "Checkpoint")
    check_state_dict(target, with_extra, "Checkpoint", ignore_unexpected=True)
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):  # shapes are checked regardless
        check_state_dict(target, dict(with_extra, **{"head.bias": torch.zeros(5)}), "Checkpoint",
                         ignore_unexpected=True)


# ------------------------------------------------------------------------------------------------ through models
def test_vqgan_checkpoint_of_other_sizes(tmp_path, tiny_vqgan_config):
    other = VQGANConfig.from_dict({
        "embed_dim": 16, "n_embed": 64,
        "hparams": {"resolution": 16, "ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1, "attn_resolutions": [8],
                    "z_channels": 8},
    })
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": VQGAN(other).state_dict()}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        VQGAN.from_ckpt(path, tiny_vqgan_config)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "VQGAN checkpoint" in message
    assert "shape mismatches" in message and "quantize.embedding.weight (file (64, 16) vs model (32, 8))" in message

    deeper = VQGANConfig.from_dict({
        "embed_dim": 8, "n_embed": 32,
        "hparams": {"resolution": 16, "ch": 32, "ch_mult": [1, 1], "num_res_blocks": 2, "attn_resolutions": [8],
                    "z_channels": 8},
    })
    torch.save({"state_dict": VQGAN(deeper).state_dict()}, path)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(\d+\): ") as err:
        VQGAN.from_ckpt(path, tiny_vqgan_config)
    assert "\n" not in str(err.value)


def test_stage2_checkpoint_of_other_sizes(tmp_path, tiny_stage2_config):
    wider = Stage2Config(**{**vars(tiny_stage2_config), "vocab_size_img": 48, "n_layers": 3})
    path = tmp_path / "stage2_last.ckpt"
    torch.save({"state_dict": Transformer1d(wider).state_dict()}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        Transformer1d.from_ckpt(tiny_stage2_config, path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "unexpected keys" in message and "blocks.2." in message
    assert "tok_emb_img.weight (file (48, 32) vs model (32, 32))" in message


def test_min_dalle_structure_complaints_are_one_line(tmp_path):
    from storyexp.models.mega import MegaConfig
    from storyexp.models.mega.loading import layer_count

    encoder = read_state_dict(parity_dir() / "mega" / "encoder.pt")
    decoder = read_state_dict(parity_dir() / "mega" / "decoder.pt")
    with pytest.raises(CheckpointMismatchError, match="embed_tokens.weight") as err:
        MegaConfig.from_state_dicts({}, decoder, encoder_source="min-dalle encoder /m/encoder.pt")
    assert "\n" not in str(err.value) and "/m/encoder.pt" in str(err.value)
    gap = {k: v for k, v in encoder.items() if not k.startswith("layers.0.")}
    with pytest.raises(CheckpointMismatchError, match="layer indices") as err:
        layer_count(gap, source="/m/encoder.pt")
    assert "\n" not in str(err.value) and "/m/encoder.pt" in str(err.value)

    folder = tmp_path / "mega"
    folder.mkdir()
    for name in ("encoder.pt", "decoder.pt", "vocab.json", "merges.txt"):
        (folder / name).symlink_to(parity_dir() / "mega" / name)
    torch.save({"w": torch.zeros(1)}, folder / "detoker.pt")  # a flat dict of tensors, but not a VQGAN decoder
    with pytest.raises(CheckpointMismatchError, match="detokenizer") as err:
        MegaDalle.from_pretrained(folder)
    assert "\n" not in str(err.value) and str(folder / "detoker.pt") in str(err.value)
