"""Builders beside the networks they build: one `source: pretrained | sizes` mechanism, typed sizes, strict keys.

The shipped tiny and demo configs parse into the typed sizes of each family; an unknown, missing or mistyped size
and a bad `source` are one-line errors naming the key; StoryDALL-E's pretrained build reads a minDALL-E folder
with the same code as `MinDalle.from_pretrained`; no family's builder imports another's.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from storyexp.errors import ConfigurationError, MissingResourceError
from storyexp.models.arldm.build import ARLDMSizes, BlipSizes, ClipSizes, UNetSizes, VAESizes, build_arldm
from storyexp.models.mega import MegaConfig, MegaSizes
from storyexp.models.mega.build import StoryMegaSizes, build_storymega
from storyexp.models.mindalle import MinDalle, Stage2Config
from storyexp.models.mindalle.build import Stage2Sizes, StoryDalleSizes, build_storydalle
from storyexp.models.sources import SOURCES, check_source
from storyexp.models.vqgan import VQGANConfig, build_stage1
from tests.conftest import compose_cfg
from tests.data_paths import parity_dir

ROOT = Path(__file__).resolve().parents[1]
MINDALLE = parity_dir() / "mindalle"


def network(model: str, tmp_path, *overrides: str) -> dict:
    cfg = compose_cfg([f"model={model}", *overrides], tmp_path)
    return OmegaConf.to_container(cfg.model.network, resolve=True)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------- typed sizes from the yaml


@pytest.mark.parametrize("overrides", [["model=mindalle_tiny"], ["model=mindalle", "data=demo"]])
def test_storydalle_sizes_parse_from_the_shipped_configs(tmp_path, overrides):
    cfg = compose_cfg(overrides, tmp_path)
    net = OmegaConf.to_container(cfg.model.network, resolve=True)
    sizes = StoryDalleSizes.from_network(net)
    assert isinstance(sizes.stage1, VQGANConfig) and isinstance(sizes.stage2, Stage2Sizes)
    assert sizes.stage2.n_layers == net["stage2"]["n_layers"]
    assert sizes.stage2.ctx_len_txt == net["stage2"]["ctx_len_txt"]
    assert sizes.stage1.n_embed == net["stage1"]["n_embed"]
    assert sizes.stage1.hparams.ch_mult == tuple(net["stage1"]["hparams"]["ch_mult"])
    config = sizes.stage2.to_config(vocab_size_txt=40, vocab_size_img=sizes.stage1.n_embed,
                                    ctx_len_img=sizes.stage1.num_codes)
    assert isinstance(config, Stage2Config) and config.embed_dim == net["stage2"]["embed_dim"]
    assert config.ctx_len_img == sizes.stage1.num_codes and config.vocab_size_txt == 40
    with pytest.raises(dataclasses.FrozenInstanceError):
        sizes.stage2.n_layers = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        sizes.stage1.hparams.ch = 64  # type: ignore[misc]


@pytest.mark.parametrize("overrides", [["model=mega_tiny"], ["model=mega", "data=demo"]])
def test_storymega_sizes_parse_from_the_shipped_configs(tmp_path, overrides):
    net = OmegaConf.to_container(compose_cfg(overrides, tmp_path).model.network, resolve=True)
    sizes = StoryMegaSizes.from_network(net)
    assert isinstance(sizes.sizes, MegaSizes) and isinstance(sizes.stage1, VQGANConfig)
    assert dataclasses.asdict(sizes.sizes) == net["sizes"]
    config = sizes.sizes.to_config(text_vocab_count=50, image_vocab_count=sizes.stage1.n_embed,
                                   image_token_count=sizes.stage1.num_codes)
    assert isinstance(config, MegaConfig)
    assert (config.encoder_layers, config.decoder_layers, config.embed_count) == (
        net["sizes"]["layers"], net["sizes"]["layers"], net["sizes"]["width"])


@pytest.mark.parametrize("overrides", [["model=arldm_tiny"], ["model=arldm", "data=demo"]])
def test_arldm_sizes_parse_from_the_shipped_configs(tmp_path, overrides):
    net = OmegaConf.to_container(compose_cfg(overrides, tmp_path).model.network, resolve=True)
    sizes = ARLDMSizes.from_network(net)
    assert sizes.width == net["width"]
    assert isinstance(sizes.clip, ClipSizes) and sizes.clip.num_layers == net["clip"]["num_layers"]
    assert isinstance(sizes.blip, BlipSizes) and sizes.blip.vision_depth == net["blip"]["vision_depth"]
    assert isinstance(sizes.unet, UNetSizes)
    assert sizes.unet.block_out_channels == tuple(net["unet"]["block_out_channels"])
    assert isinstance(sizes.vae, VAESizes) and sizes.vae.kind == net["vae"]["kind"]
    kwargs = sizes.to_kwargs()
    assert kwargs["width"] == net["width"] and kwargs["latent_scale_factor"] == net["latent_scale_factor"]
    assert kwargs["vae"] == net["vae"]


def test_stage1_sizes_and_the_stage1_builder(tmp_path):
    net = network("mindalle_tiny", tmp_path)
    config = VQGANConfig.from_sizes(net["stage1"])
    assert config == VQGANConfig.from_dict(net["stage1"])  # every size given: the lenient reading agrees
    first, second = build_stage1(config, seed=3), build_stage1(net["stage1"], seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


# ---------------------------------------------------------------------------------- strict keys, one line each


def test_unknown_and_missing_stage2_sizes_are_named(tmp_path):
    net = network("mindalle_tiny", tmp_path)
    story, chars = {}, ["pororo"]
    bad = {**net, "stage2": {**net["stage2"], "n_layer": 3}}
    with pytest.raises(ConfigurationError) as err:
        build_storydalle(bad, story, chars, story_len=4, sent_embed=16)
    assert one_line(err).startswith("model.network.stage2.n_layer is not a known size: known are embed_dim, n_layers")
    stage2 = dict(net["stage2"])
    del stage2["n_layers"]
    with pytest.raises(ConfigurationError) as err:
        build_storydalle({**net, "stage2": stage2}, story, chars, story_len=4, sent_embed=16)
    assert one_line(err) == "model.network.stage2.n_layers is missing."
    with pytest.raises(ConfigurationError) as err:
        build_storydalle({**net, "stage2": {**net["stage2"], "vocab_size_txt": 99}}, story, chars, 4, 16)
    assert "model.network.stage2.vocab_size_txt" in one_line(err) and "tokenizer" in str(err.value)
    with pytest.raises(ConfigurationError) as err:
        build_storydalle({**net, "stage2": {**net["stage2"], "n_heads": "two"}}, story, chars, 4, 16)
    assert one_line(err) == "model.network.stage2.n_heads must be an int, got 'two'."
    with pytest.raises(ConfigurationError) as err:
        build_storydalle({k: v for k, v in net.items() if k != "stage2"}, story, chars, 4, 16)
    assert one_line(err) == "model.network.stage2 is missing."


def test_unknown_and_missing_stage1_sizes_are_named(tmp_path):
    net = network("mega_tiny", tmp_path)
    hparams = dict(net["stage1"]["hparams"])
    del hparams["ch"]
    with pytest.raises(ConfigurationError) as err:
        build_storymega({**net, "stage1": {**net["stage1"], "hparams": hparams}}, {}, [])
    assert one_line(err) == "model.network.stage1.hparams.ch is missing."
    with pytest.raises(ConfigurationError) as err:
        build_storymega({**net, "stage1": {**net["stage1"], "n_embeds": 32}}, {}, [])
    assert one_line(err).startswith("model.network.stage1.n_embeds is not a known size: known are")


def test_unknown_and_missing_mega_sizes_are_named(tmp_path):
    net = network("mega_tiny", tmp_path)
    sizes = dict(net["sizes"])
    sizes["widht"] = sizes.pop("width")
    with pytest.raises(ConfigurationError) as err:
        build_storymega({**net, "sizes": sizes}, {}, ["pororo"])
    assert one_line(err) == ("model.network.sizes.widht is not a known size: known are layers, width, heads, glu, "
                             "text_tokens.")
    del sizes["widht"]
    with pytest.raises(ConfigurationError) as err:
        build_storymega({**net, "sizes": sizes}, {}, ["pororo"])
    assert one_line(err) == "model.network.sizes.width is missing."


def test_unknown_and_missing_arldm_sizes_are_named(tmp_path):
    net = network("arldm_tiny", tmp_path)
    bad = {k: v for k, v in net.items() if k != "width"}
    with pytest.raises(ConfigurationError) as err:
        build_arldm({**bad, "widht": 32}, ["pororo"], max_length=8)
    assert one_line(err).startswith("model.network.widht is not a known size: known are width, clip, blip, unet")
    with pytest.raises(ConfigurationError) as err:
        build_arldm(bad, ["pororo"], max_length=8)
    assert one_line(err) == "model.network.width is missing."
    with pytest.raises(ConfigurationError) as err:
        build_arldm({**net, "clip": {**net["clip"], "hidden_size": 64}}, ["pororo"], max_length=8)
    assert one_line(err) == "model.network.clip.hidden_size is not a size to set here: it is model.network.width."
    with pytest.raises(ConfigurationError) as err:
        build_arldm({**net, "unet": {**net["unet"], "layers_per_blok": 1}}, ["pororo"], max_length=8)
    assert one_line(err).startswith("model.network.unet.layers_per_blok is not a known size")
    with pytest.raises(ConfigurationError) as err:
        build_arldm({**net, "vae": {"kind": "pixel", "factr": 2}}, ["pororo"], max_length=8)
    assert one_line(err).startswith("model.network.vae.factr is not a known size")
    with pytest.raises(ConfigurationError) as err:
        build_arldm({**net, "source": "pretrained", "stable_diffusion": "sd"}, ["pororo"], max_length=8)
    assert one_line(err).startswith("model.network.{blip, clip, seed, unet, vae, width, words} are not known options "
                                    "(source: pretrained): known are stable_diffusion, blip_checkpoint")


def test_extra_unet_arguments_pass_through(tmp_path):
    net = network("arldm_tiny", tmp_path)
    sizes = ARLDMSizes.from_network({**net, "unet": {**net["unet"], "act_fn": "silu"}})
    assert sizes.unet.extra == {"act_fn": "silu"} and sizes.unet.to_kwargs()["act_fn"] == "silu"


@pytest.mark.parametrize("model", ["mindalle_tiny", "mega_tiny", "arldm_tiny"])
def test_bad_source_is_one_line(tmp_path, model):
    net = {**network(model, tmp_path), "source": "pretrianed"}
    build = {
        "mindalle_tiny": lambda: build_storydalle(net, {}, [], story_len=4, sent_embed=16),
        "mega_tiny": lambda: build_storymega(net, {}, []),
        "arldm_tiny": lambda: build_arldm(net, [], max_length=8),
    }[model]
    with pytest.raises(ConfigurationError) as err:
        build()
    assert one_line(err) == "model.network.source='pretrianed' is not valid: it must be one of pretrained, sizes."
    assert SOURCES == ("pretrained", "sizes") and check_source({"source": "sizes"}) == "sizes"
    with pytest.raises(ConfigurationError, match="source=None"):
        check_source({})


# --------------------------------------------------------------------------- one minDALL-E folder reader, shared


def test_storydalle_pretrained_build_and_mindalle_read_the_folder_alike(tmp_path):
    net = {**network("mindalle", tmp_path, "data=pororo"), "mindalle": str(MINDALLE)}
    built = build_storydalle(net, {}, [], story_len=4, sent_embed=16)
    reference = MinDalle.from_pretrained(MINDALLE)
    for ours, theirs in [(built.stage1, reference.stage1), (built.net.stage2, reference.stage2)]:
        a, b = ours.state_dict(), theirs.state_dict()
        assert list(a) == list(b)
        assert all(torch.equal(a[k], b[k]) for k in a)
    captions = ["a red ball", "Pororo plays in the snow"]
    assert [e.ids for e in built.tokenizer.encode_batch(captions)] == reference.tokenize(captions).tolist()


def test_missing_mindalle_files_give_one_message_both_ways(tmp_path):
    (tmp_path / "config.yaml").write_text((MINDALLE / "config.yaml").read_text())
    with pytest.raises(MissingResourceError) as direct:
        MinDalle.from_pretrained(tmp_path)
    net = {**network("mindalle", tmp_path / "cfg", "data=pororo"), "mindalle": str(tmp_path)}
    with pytest.raises(MissingResourceError) as built:
        build_storydalle(net, {}, [], story_len=4, sent_embed=16)
    assert str(direct.value) == str(built.value)
    assert "stage1_last.ckpt, stage2_last.ckpt" in str(direct.value) and "1.3B.tar.gz" in str(direct.value)


# ------------------------------------------------------------------------------------------------ layering


def _imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(("." * node.level) + node.module)
    return modules


def test_builders_live_beside_their_models_and_do_not_import_each_other():
    assert not list((ROOT / "storyexp" / "systems").glob("*_builder.py"))
    mega = _imported_modules(ROOT / "storyexp" / "models" / "mega" / "build.py")
    assert not any("mindalle" in m or m.startswith("storyexp.systems") for m in mega), mega
    for family in ("arldm", "mindalle", "mega", "vqgan"):
        imported = _imported_modules(ROOT / "storyexp" / "models" / family / "build.py")
        assert not any(m.startswith(("storyexp.systems", "lightning", "pytorch_lightning")) for m in imported)
        others = {"arldm", "mindalle", "mega"} - {family}
        assert not any(m.startswith(tuple(f"storyexp.models.{o}" for o in others)) for m in imported), imported
    for system, family in [("arldm", "arldm"), ("storydalle", "mindalle"), ("storymega", "mega")]:
        imported = _imported_modules(ROOT / "storyexp" / "systems" / f"{system}.py")
        assert f"storyexp.models.{family}.build" in imported
