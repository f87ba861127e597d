"""The real published files load: tiny files shaped like them.

- min-dalle's encoder.pt / decoder.pt were converted from dalle-mini's flax parameters, where several LayerNorms have
  no scale (min-dalle's flax port: `nn.LayerNorm(use_scale=False)` for `pre_self_attn_layer_norm`,
  `pre_encoder_attn_layer_norm`, `glu.ln0`, `glu.ln1`, `final_ln`), so their `.weight` keys are absent. The parity
  files (which have every key) are written again without those keys.
- taming-transformers' `last.ckpt` was written by Lightning 1.0, which pickles the callback *class* as the key of
  its state (`{'callbacks': {ModelCheckpoint: {...}}}`). The pickle is made here with throwaway classes under the
  names Lightning 1.x used, and loaded after they are gone.
"""

from __future__ import annotations

import contextlib
import functools
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch

from storyexp.models.mega import MegaDalle
from storyexp.models.mega.build import build_storymega
from storyexp.models.mega.loading import layer_norm_scales
from storyexp.models.vqgan import VQGAN, VQGANConfig, build_stage1
from storyexp.utils.loading import CheckpointMismatchError, NameOnlyGlobal, UnsafeFileError, load_file
from tests.data_paths import parity_dir

MEGA = parity_dir() / "mega"
SHARED = ("detoker.pt", "vocab.json", "merges.txt")
# the LayerNorms dalle-mini builds without a scale (force_ln_scale=False), by their names in min-dalle's files
SCALE_FREE = ("pre_self_attn_layer_norm.weight", "pre_encoder_attn_layer_norm.weight", "glu.ln0.weight",
              "glu.ln1.weight", "final_ln.weight")


@functools.cache
def heads() -> int:
    return torch.load(MEGA / "cases.pt", map_location="cpu", weights_only=True)["meta"]["sizes"]["attention_head_count"]


def flax_converted(name: str, drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The parity file `name` as the flax conversion writes it: no scale for the scale-free LayerNorms."""
    state = torch.load(MEGA / name, map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if not k.endswith(SCALE_FREE) and k not in drop}


def min_dalle_folder(folder: Path, encoder: dict, decoder: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        (folder / name).symlink_to(MEGA / name)
    torch.save(encoder, folder / "encoder.pt")
    torch.save(decoder, folder / "decoder.pt")
    return folder


def test_min_dalle_files_without_layer_norm_scales_load_as_min_dalle_does(tmp_path):
    encoder, decoder = flax_converted("encoder.pt"), flax_converted("decoder.pt")
    model = MegaDalle.from_pretrained(min_dalle_folder(tmp_path / "m", encoder, decoder), attention_heads=heads())
    for module, state in ((model.encoder, encoder), (model.decoder, decoder)):
        own = module.state_dict()
        absent = set(own) - set(state)
        assert absent and all(k.endswith(SCALE_FREE) for k in absent)  # the shape of the real files
        assert absent <= layer_norm_scales(module)
        assert "final_ln.weight" in absent and "layers.0.glu.ln1.weight" in absent
        for key in absent:
            assert torch.equal(own[key], torch.ones_like(own[key])), key  # an absent scale is 1
        for key, value in state.items():
            assert torch.equal(own[key], value.float()), key  # everything else is the file's


def test_absent_scale_is_set_to_one_not_left_as_it_was():
    from storyexp.models.mega.loading import load_checked

    model = MegaDalle.from_pretrained(MEGA, attention_heads=heads())  # the parity files: every scale present
    scales = layer_norm_scales(model.encoder)
    assert any(not torch.all(model.encoder.state_dict()[k] == 1) for k in scales)  # so "1" below is the loader's
    load_checked(model.encoder, flax_converted("encoder.pt"), "encoder.pt")
    own = model.encoder.state_dict()
    for key in scales:
        assert torch.all(own[key] == 1) == key.endswith(SCALE_FREE), key


def test_other_missing_keys_are_one_line_naming_them(tmp_path):
    encoder = flax_converted("encoder.pt", drop=("layers.0.glu.fc1.weight", "final_ln.bias"))
    folder = min_dalle_folder(tmp_path / "m", encoder, flax_converted("decoder.pt"))
    with pytest.raises(CheckpointMismatchError) as err:
        MegaDalle.from_pretrained(folder, attention_heads=heads())
    message = str(err.value)
    assert "\n" not in message and str(folder / "encoder.pt") in message
    assert "missing keys (2): final_ln.bias, layers.0.glu.fc1.weight;" in message  # a LayerNorm bias is not optional
    assert "ln0" not in message and "final_ln.weight" not in message  # the absent scales are not complaints


# ------------------------------------------------------------------------------------------------ taming last.ckpt
VQGAN_SIZES = {"embed_dim": 8, "n_embed": 32,
               "hparams": {"resolution": 16, "ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1,
                           "attn_resolutions": [8], "z_channels": 8}}


@contextlib.contextmanager
def throwaway_classes(monkeypatch, names: list[str]):
    """Classes registered under `names` ("package.module.Class") for as long as the block runs, so that pickle
    writes references to them; afterwards nothing under those names can be imported from them."""
    classes = {}
    with monkeypatch.context() as patch:
        for full in names:
            module_name, _, qualname = full.rpartition(".")
            parts = module_name.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if not isinstance(sys.modules.get(name), _Throwaway):
                    patch.setitem(sys.modules, name, _Throwaway(name))
            base = dict if qualname == "AttributeDict" else object  # Lightning 1.x's AttributeDict is a dict
            cls = type(qualname, (base,), {"__module__": module_name, "__qualname__": qualname})
            setattr(sys.modules[module_name], qualname, cls)
            classes[full] = cls
        yield classes


class _Throwaway(types.ModuleType):
    pass


MODEL_CHECKPOINT = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"


def taming_last_ckpt(vqgan: VQGAN, callback_key) -> dict:
    """What Lightning 1.0.8's `dump_checkpoint` writes for taming's VQModel (two Adam optimizers: autoencoder and
    discriminator; the GAN loss's LPIPS / discriminator weights under `loss.`)."""
    state = dict(vqgan.state_dict())
    state.update({"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4),
                  "loss.perceptual_loss.lin0.model.1.weight": torch.randn(1, 4, 1, 1)})
    adam = {"state": {0: {"step": 10, "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}},
            "param_groups": [{"lr": 4.5e-6, "betas": (0.5, 0.9), "eps": 1e-8, "weight_decay": 0, "amsgrad": False,
                              "params": [0]}]}
    return {"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.0.8",
            "callbacks": {callback_key: {"monitor": "val/rec_loss", "best_model_score": torch.tensor(0.25),
                                         "best_model_path": "logs/x/checkpoints/epoch=3.ckpt",
                                         "current_score": torch.tensor(0.25), "dirpath": "logs/x/checkpoints"}},
            "optimizer_states": [adam, adam], "lr_schedulers": [], "state_dict": state}


@pytest.fixture(scope="module")
def tiny_vqgan() -> VQGAN:
    torch.manual_seed(0)
    return VQGAN(VQGANConfig.from_dict(VQGAN_SIZES))


@pytest.mark.parametrize("legacy", [False, True], ids=["torch zip", "torch legacy"])
def test_lightning_1_checkpoint_loads_with_its_callback_class_allowed_by_name(tmp_path, monkeypatch, tiny_vqgan,
                                                                           legacy):
    path = tmp_path / "last.ckpt"
    with throwaway_classes(monkeypatch, [MODEL_CHECKPOINT]) as classes:
        torch.save(taming_last_ckpt(tiny_vqgan, classes[MODEL_CHECKPOINT]), path,
                   _use_new_zipfile_serialization=not legacy)
    with pytest.raises(pickle.UnpicklingError, match=MODEL_CHECKPOINT):  # control: the pickle names the class
        torch.load(path, map_location="cpu", weights_only=True)
    assert not isinstance(sys.modules.get("pytorch_lightning"), _Throwaway)  # the classes are gone again
    imported_before = "pytorch_lightning.callbacks.model_checkpoint" in sys.modules

    ckpt = load_file(path, "taming VQGAN checkpoint")
    (key,) = ckpt["callbacks"]
    assert isinstance(key, type) and issubclass(key, NameOnlyGlobal) and key.pickled_name == MODEL_CHECKPOINT
    assert ckpt["callbacks"][key]["monitor"] == "val/rec_loss" and ckpt["global_step"] == 1000
    assert ("pytorch_lightning.callbacks.model_checkpoint" in sys.modules) == imported_before  # nothing imported
    want = tiny_vqgan.state_dict()
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in want.items())

    # end to end: the paths that hand a taming last.ckpt to a model (its loss.* keys are not model):
    # `model.network.stage1_checkpoint`, and StoryDALL-E (Mega)'s `vqgan_encoder` beside flax-shaped min-dalle files
    config = VQGANConfig.from_dict(VQGAN_SIZES)
    folder = min_dalle_folder(tmp_path / "min-dalle", flax_converted("encoder.pt"), flax_converted("decoder.pt"))
    mega = build_storymega({"source": "pretrained", "min_dalle": str(folder), "attention_heads": heads(),
                            "vqgan_encoder": str(path), "vqgan_config": VQGAN_SIZES}, {"condition": False}, [])
    for vqgan in (VQGAN.from_ckpt(path, config), build_stage1(config, path), mega.stage1):
        got = vqgan.state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], v) for k, v in want.items())


def test_lightning_1_checkpoint_with_another_class_is_refused_in_one_line(tmp_path, monkeypatch, tiny_vqgan):
    other = "pytorch_lightning.utilities.parsing.AttributeDict"
    path = tmp_path / "last.ckpt"
    with throwaway_classes(monkeypatch, [MODEL_CHECKPOINT, other]) as classes:
        ckpt = taming_last_ckpt(tiny_vqgan, classes[MODEL_CHECKPOINT])
        ckpt["hyper_parameters"] = classes[other](lr=1e-4)
        torch.save(ckpt, path)
    with pytest.raises(UnsafeFileError) as err:
        load_file(path, "taming VQGAN checkpoint")
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "refused" in message
    assert other in message and MODEL_CHECKPOINT not in message  # the allowed name is not the reason


def test_building_an_object_of_an_allowed_name_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    with throwaway_classes(monkeypatch, [MODEL_CHECKPOINT]) as classes:
        torch.save({"callbacks": [classes[MODEL_CHECKPOINT]()], "state_dict": {}}, path)  # an object, not a name
    with pytest.raises(UnsafeFileError) as err:
        load_file(path, "taming VQGAN checkpoint")
    message = str(err.value)
    assert "\n" not in message and str(path) in message and MODEL_CHECKPOINT in message and "build" in message
