"""Loading min-dalle's files: folder layouts, missing files, key checks, condition-layer keys.

Uses the parity files (README §2.2) as the "released" files; temporary folders link to them, so nothing big is
copied. Modified state dicts are written only for the small encoder / decoder files.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from tests.conftest import parity_dir

MEGA = parity_dir() / "mega"

from storyexp.errors import MissingResourceError  # noqa: E402
from storyexp.models.mega import DalleBartDecoder, MegaDalle, is_condition_key  # noqa: E402
from storyexp.utils.loading import CheckpointMismatchError  # noqa: E402

FILES = ("encoder.pt", "decoder.pt", "detoker.pt", "vocab.json", "merges.txt")


@functools.cache
def heads() -> int:
    return torch.load(MEGA / "cases.pt", map_location="cpu", weights_only=True)["meta"]["sizes"]["attention_head_count"]


def link(folder: Path, files=FILES, rename: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        target = folder / (rename or {}).get(name, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(MEGA / name)
    return folder


def sd(name: str) -> dict:
    return dict(torch.load(MEGA / name, map_location="cpu", weights_only=True))


def test_missing_file_names_it_and_where_to_get_it(tmp_path):
    folder = link(tmp_path / "m", [f for f in FILES if f != "detoker.pt"])
    with pytest.raises(MissingResourceError) as err:
        MegaDalle.from_pretrained(folder, attention_heads=heads())
    msg = str(err.value)
    assert "detoker.pt" in msg and str(folder) in msg and "huggingface.co/kuprel/min-dalle" in msg
    assert "encoder.pt" not in msg.split("not found")[0]  # only the missing file is listed
    with pytest.raises(MissingResourceError, match="encoder.pt.*decoder.pt.*detoker.pt"):
        MegaDalle.from_pretrained(tmp_path / "empty", attention_heads=heads())


def test_min_dalle_models_root_layout(tmp_path):
    rename = {name: f"dalle_bart_mega/{name}" for name in FILES if name != "detoker.pt"}
    rename["detoker.pt"] = "vqgan/detoker.pt"
    root = link(tmp_path / "models_root", rename=rename)
    a = MegaDalle.from_pretrained(root, attention_heads=heads())
    b = MegaDalle.from_pretrained(MEGA, attention_heads=heads())
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka


def test_unexpected_and_missing_keys_are_listed(tmp_path):
    folder = link(tmp_path / "m", [f for f in FILES if f != "encoder.pt"])
    state = sd("encoder.pt")
    state["layers.0.self_attn.q_proj.bias"] = torch.zeros(state["layers.0.self_attn.q_proj.weight"].shape[0])
    state.pop("final_ln.bias")
    torch.save(state, folder / "encoder.pt")
    with pytest.raises(CheckpointMismatchError) as err:
        MegaDalle.from_pretrained(folder, attention_heads=heads())
    msg = str(err.value)
    assert "unexpected keys (1)" in msg and "layers.0.self_attn.q_proj.bias" in msg
    assert "missing keys (1)" in msg and "final_ln.bias" in msg


def _write_deeper_decoder(folder: Path, layers: int, with_condition_keys: bool) -> dict:
    """A decoder.pt shaped like the parity one but with `layers` layers (random weights, float16 as released)."""
    base = sd("decoder.pt")
    d, glu = base["embed_positions.weight"].shape[1], base["layers.0.glu.fc0.weight"].shape[0]
    torch.manual_seed(0)
    vocab, positions = base["embed_tokens.weight"].shape[0] - 1, base["embed_positions.weight"].shape[0]
    net = DalleBartDecoder(layers, d, heads(), glu, vocab, positions, condition_layers=True, gate_init="zero")
    state = {k: v.half() for k, v in net.state_dict().items() if with_condition_keys or not is_condition_key(k)}
    torch.save(state, folder / "decoder.pt")
    return state


def test_condition_keys_may_be_missing_only_when_condition_layers_are_built(tmp_path):
    layers = 3  # the fewest that give a condition layer ((i + 1) % 3 == 0); the parity decoder has too few
    folder = link(tmp_path / "m", [f for f in FILES if f != "decoder.pt"])
    state = _write_deeper_decoder(folder, layers, with_condition_keys=False)
    m = MegaDalle.from_pretrained(folder, attention_heads=heads(), condition_layers=True)
    assert m.decoder.condition_layer_indices == [i for i in range(layers) if (i + 1) % 3 == 0]
    own = m.decoder.state_dict()
    assert {k for k in own if k not in state} == {k for k in own if is_condition_key(k)} != set()
    for i in m.decoder.condition_layer_indices:
        assert m.decoder.layers[i].condition_gate.item() == 0.0  # initial value kept: starts as the plain decoder
    plain = MegaDalle.from_pretrained(folder, attention_heads=heads())  # the released format loads as is
    assert plain.decoder.condition_layer_indices == []

    # a file that has the condition keys (a StoryDALL-E checkpoint) fills them; a plain decoder rejects them
    state = _write_deeper_decoder(folder, layers, with_condition_keys=True)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys[\s\S]*condition_attn\.q_proj\.weight"):
        MegaDalle.from_pretrained(folder, attention_heads=heads())
    full = MegaDalle.from_pretrained(folder, attention_heads=heads(), condition_layers=True)
    own = full.decoder.state_dict()
    assert set(own) == set(state) and all(torch.equal(own[k], v.float()) for k, v in state.items())


def test_default_head_count_is_width_over_64():
    from storyexp.errors import ConfigurationError

    width = sd("encoder.pt")["embed_tokens.weight"].shape[1]
    if width % 64:
        with pytest.raises(ConfigurationError):
            MegaDalle.from_pretrained(MEGA)
    else:
        assert MegaDalle.from_pretrained(MEGA).encoder.layers[0].self_attn.heads == width // 64
