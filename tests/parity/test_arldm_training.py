"""One AR-LDM training step (``ARLDM.forward`` of the original) with the recorded random draws injected."""

from __future__ import annotations

import functools

import pytest
import torch

from . import arldm_support as S


TRAIN_CASES = sorted(S.meta()["train_cases"])


@functools.cache
def _step(case: str):
    """Run the training step once per case (shared by the tests below)."""
    d = S.npz(f"pipeline/{case}")
    model = S.parity_model().model
    # the VAE posterior sample is mean + std * eps: recover the recorded eps
    eps = (S.t(d["latent_sample"]) - S.t(d["latent_mean"])) / S.t(d["latent_std"])
    with torch.no_grad():
        return model.training_loss(
            S.t(d["images"]),
            S.t(d["captions"]),
            S.t(d["attention_mask"]),
            S.t(d["source_images"]),
            S.t(d["source_caption"]),
            S.t(d["source_attention_mask"]),
            cfg_rows=S.t(d["classifier_free_idx"]),
            posterior_eps=eps,
            noise=S.t(d["noise"]),
            timesteps=S.t(d["timesteps"]),
        )


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_inputs_are_consistent_with_case_metadata(case):
    info = S.meta()["train_cases"][case]
    d = S.npz(f"pipeline/{case}")
    b, v, s = d["captions"].shape
    assert (b, v, s) == (info["B"], info["V"], info["S"])
    assert d["source_caption"].shape[1] == info["src_V"]
    assert sorted(int(i) for i in d["classifier_free_idx"].nonzero()[0]) == info["cfg_dropped_rows"]
    # the batch tensors are the documented pre-processing of the raw uint8 images
    from storyexp.models.arldm import blip_preprocess

    images = S.t(d["images_uint8"]).permute(0, 1, 4, 2, 3).float() / 255 * 2 - 1
    S.assert_close(images, d["images"], S.ATOL, "images from uint8")
    model = S.parity_model().model
    source = blip_preprocess(S.t(d["source_images_uint8"]), model.mm_encoder.image_size)
    S.assert_close(source, d["source_images"], S.ATOL, "BLIP source images from uint8")


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_encoders(case):
    d = S.npz(f"pipeline/{case}")
    out = _step(case)
    S.assert_close(out.caption_embeds, d["clip_caption_embeddings"], S.ATOL, "CLIP caption embeddings")
    S.assert_close(out.source_embeds, d["blip_source_embeddings"], S.ATOL, "BLIP source embeddings")
    S.assert_close(out.null_caption, d["clip_null_embedding"], S.ATOL, "CLIP null embedding")
    S.assert_close(out.null_source, d["blip_null_embedding"], S.ATOL, "BLIP null embedding")
    model = S.parity_model().model
    S.assert_close(model.modal_type_embeddings.weight, d["modal_type_embeddings"], 0.0, "modal table")
    S.assert_close(model.time_embeddings.weight, d["time_embeddings"], 0.0, "time table")
    # the padding mask matters for CLIP: without it the recorded diagnostic is reproduced instead
    b, v, s = d["captions"].shape
    with torch.no_grad():
        unmasked = model.encode_captions(S.t(d["captions"]).reshape(b * v, s), None)
    S.assert_close(unmasked, d["clip_caption_embeddings_without_mask"], S.ATOL, "CLIP without mask")


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_context_and_mask(case):
    d = S.npz(f"pipeline/{case}")
    out = _step(case)
    S.assert_close(out.encoder_hidden_states, d["encoder_hidden_states"], S.ATOL, "context")
    S.assert_equal(out.encoder_attention_mask, d["encoder_attention_mask"], "mask")
    S.assert_equal(out.cfg_rows, d["classifier_free_idx"], "CFG rows")


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_latents_noise_and_loss(case):
    d = S.npz(f"pipeline/{case}")
    info = S.meta()["train_cases"][case]
    out = _step(case)
    model = S.parity_model().model
    S.assert_close(out.latent_mean, d["latent_mean"], S.ATOL, "VAE posterior mean")
    S.assert_close(out.latent_std, d["latent_std"], S.ATOL, "VAE posterior std")
    # the recorded scaling is the model's latent scale factor
    sample = S.t(d["latent_sample"]).double()
    ratio = float((S.t(d["latents_scaled"]).double() * sample).sum() / (sample * sample).sum())
    assert abs(ratio - model.latent_scale_factor) <= 1e-6 * model.latent_scale_factor
    S.assert_close(out.latents, d["latents_scaled"], S.ATOL, "scaled latents")
    S.assert_close(out.noisy_latents, d["noisy_latents"], S.ATOL, "noisy latents")
    S.assert_close(out.noise_pred, d["noise_pred"], S.ATOL, "noise prediction")
    S.assert_close(out.loss, d["loss"], S.ATOL, "loss")
    assert abs(out.loss.item() - info["loss"]) <= S.ATOL
