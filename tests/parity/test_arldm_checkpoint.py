"""Loading: the original Lightning checkpoint (strict), the Salesforce BLIP file, the pretrained folders."""

from __future__ import annotations

import pytest
import torch

from . import arldm_support as S


from storyexp.models.arldm import (  # noqa: E402
    BlipMultimodalConfig,
    BlipMultimodalEncoder,
    load_blip_checkpoint,
    load_original_arldm_checkpoint,
    load_salesforce_blip_state_dict,
)
from storyexp.utils.loading import CheckpointMismatchError  # noqa: E402


def test_checkpoint_loads_strictly_and_every_tensor_arrives():
    model = S.parity_model().model  # built from pretrained/ + blip/, then loaded strictly
    ours = model.state_dict()
    ckpt = S.checkpoint_state_dict()
    # spot checks through each name mapping
    pairs = {
        "modal_type_embeddings.weight": "modal_type_embeddings.weight",
        "time_embeddings.weight": "time_embeddings.weight",
        "text_encoder.embeddings.token_embedding.weight": "text_encoder.text_model.embeddings.token_embedding.weight",
        "text_encoder.embeddings.position_embedding.weight": "text_encoder.text_model.embeddings.position_embedding.weight",
        "mm_encoder.vision.embeddings.class_embedding": "mm_encoder.visual_encoder.cls_token",
        "mm_encoder.vision.embeddings.position_embedding": "mm_encoder.visual_encoder.pos_embed",
        "mm_encoder.vision.encoder.layers.0.self_attn.qkv.weight": "mm_encoder.visual_encoder.blocks.0.attn.qkv.weight",
        "mm_encoder.vision.post_layernorm.weight": "mm_encoder.visual_encoder.norm.weight",
        "mm_encoder.text.embeddings.word_embeddings.weight": "mm_encoder.text_encoder.embeddings.word_embeddings.weight",
        "vae.encoder.mid_block.attentions.0.to_q.weight": "vae.encoder.mid_block.attentions.0.query.weight",
        "vae.decoder.mid_block.attentions.0.to_out.0.bias": "vae.decoder.mid_block.attentions.0.proj_attn.bias",
    }
    for mine, original in pairs.items():
        S.assert_equal(ours[mine], ckpt[original], mine)
    # number of tensors: every checkpoint entry except the dropped position_ids buffers has a home
    dropped = [k for k in ckpt if k.endswith("embeddings.position_ids")]
    assert len(ours) == len(ckpt) - len(dropped)
    # the sizes came from the tokenizers / max_length, and match the checkpoint
    sizes = S.meta()["sizes"]
    assert model.text_encoder.config.vocab_size == sizes["clip_vocab_after_new_tokens"]
    assert model.text_encoder.config.max_position_embeddings == sizes["S"] == model.max_length
    assert model.mm_encoder.config.vocab_size == sizes["blip_vocab_after_new_tokens"]
    assert model.width == sizes["D"]


def test_vae_equals_pretrained_and_checkpoint():
    fresh = S.build_from_pretrained().model.vae.state_dict()
    loaded = S.parity_model().model.vae.state_dict()
    for key in fresh:
        S.assert_equal(loaded[key], fresh[key], f"vae {key}")


def test_pretrained_build_keeps_pretrained_rows():
    """CLIP token/position rows and BERT word rows of the pretrained files survive the resizes."""
    import json

    from transformers import CLIPTextModel

    sizes = S.meta()["sizes"]
    model = S.build_from_pretrained().model
    clip = CLIPTextModel.from_pretrained(str(S.ARLDM_DIR / "pretrained" / "text_encoder"))
    old_tok = clip.embeddings.token_embedding.weight
    old_pos = clip.embeddings.position_embedding.weight
    new = model.text_encoder.embeddings
    S.assert_equal(new.token_embedding.weight[: old_tok.shape[0]], old_tok, "CLIP token rows")
    n = min(old_pos.shape[0], sizes["S"])
    S.assert_equal(new.position_embedding.weight[:n], old_pos[:n], "CLIP position rows")
    assert new.position_embedding.weight.shape[0] == sizes["S"]
    S.assert_equal(new.position_ids, torch.arange(sizes["S"]).view(1, -1), "position_ids")
    blip = load_blip_checkpoint(S.ARLDM_DIR / "blip" / "model_large_tiny.pth")
    words = blip["text_encoder.embeddings.word_embeddings.weight"]
    S.assert_equal(model.mm_encoder.text.embeddings.word_embeddings.weight[: words.shape[0]], words, "BERT rows")
    assert model.mm_encoder.config.vision_layer_norm_eps == json.loads(
        (S.ARLDM_DIR / "blip" / "vit_config.json").read_text()
    ).get("layer_norm_eps", 1e-6)


def test_blip_file_has_extra_keys_and_loads_without_resize():
    state = load_blip_checkpoint(S.ARLDM_DIR / "blip" / "model_large_tiny.pth")
    assert any(not k.startswith(("visual_encoder.", "text_encoder.")) for k in state)  # vision_proj, queues, ...
    import json

    config = BlipMultimodalConfig.from_med_config(
        S.ARLDM_DIR / "blip" / "med_config.json", json.loads((S.ARLDM_DIR / "blip" / "vit_config.json").read_text())
    )
    config.vocab_size = state["text_encoder.embeddings.word_embeddings.weight"].shape[0]
    encoder = BlipMultimodalEncoder(config)
    load_salesforce_blip_state_dict(encoder, state, allow_resize=False)
    S.assert_equal(encoder.vision.embeddings.position_embedding, state["visual_encoder.pos_embed"], "pos_embed")
    broken = {k: v for k, v in state.items() if k != "visual_encoder.blocks.0.attn.qkv.bias"}
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): vision\.encoder\.layers\.0\.self_attn\.qkv\.bias"):
        load_salesforce_blip_state_dict(encoder, broken)


def test_checkpoint_errors_list_missing_and_unexpected_keys(tmp_path):
    ckpt = S._checkpoint()
    state = dict(ckpt["state_dict"])
    removed = "unet.conv_in.weight"
    del state[removed]
    state["unet.not_a_layer.weight"] = torch.zeros(1)
    path = tmp_path / "broken.ckpt"
    torch.save({**ckpt, "state_dict": state}, path)
    model = S.build_from_pretrained().model
    with pytest.raises(CheckpointMismatchError) as err:
        load_original_arldm_checkpoint(model, path)
    message = str(err.value)
    assert "missing keys" in message and removed in message
    assert "unexpected keys" in message and "unet.not_a_layer.weight" in message
