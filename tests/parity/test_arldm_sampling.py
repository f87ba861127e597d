"""Guided auto-regressive sampling with BLIP feedback (``ARLDM.sample`` / ``diffusion`` of the original).

Step by step, each check is fed the *recorded* inputs so that errors do not compound (atol 1e-5, guided noise
1e-5 * max(1, g)); whole per-frame trajectories from the recorded start latents and context are held to 1e-4;
the end-to-end ``sample`` call is checked against every record as well (see ``test_end_to_end_sample``).
"""

from __future__ import annotations

import functools

import pytest
import torch

from . import arldm_support as S


from storyexp.models.arldm import blip_preprocess, blip_resize, to_uint8_images  # noqa: E402

SAMPLE_CASES = sorted(S.meta()["sample_cases"])
# End-to-end only, after a generated uint8 pixel rounded the other way and went through BLIP (README 5).
LOOSE_ATOL = 1e-3


def _case(case):
    info = S.meta()["sample_cases"][case]
    d = S.npz(f"pipeline/{case}")
    return info, d


def _batch(d):
    return [S.t(d[k]) for k in ("captions", "attention_mask", "source_images", "source_caption", "source_attention_mask")]


def _offset(d) -> int:
    """src_V - V: target i is source frame i + offset."""
    return d["source_caption"].shape[1] - d["captions"].shape[1]


def _frames(d) -> range:
    return range(d["captions"].shape[1])


@functools.cache
def _contexts(case):
    _, d = _case(case)
    with torch.no_grad():
        return S.parity_model().model.sampling_contexts(*_batch(d))


@pytest.mark.parametrize("case", SAMPLE_CASES)
def test_scheduler_timesteps(case):
    info, d = _case(case)
    scheduler = S.build_scheduler(info["scheduler_config"])
    scheduler.set_timesteps(info["num_inference_steps"])
    S.assert_equal(scheduler.timesteps, d["scheduler_timesteps"], "scheduler timesteps")
    assert scheduler.timesteps.tolist() == info["timesteps"]
    for i in _frames(d):
        S.assert_equal(scheduler.timesteps, d[f"frame{i}_step_timesteps"], f"frame {i} step timesteps")


@pytest.mark.parametrize("case", SAMPLE_CASES)
def test_initial_contexts_and_masks(case):
    _, d = _case(case)
    ctx = _contexts(case)
    S.assert_close(ctx["source_embeds"], d["blip_source_embeddings"], S.ATOL, "BLIP of the GT source frames")
    S.assert_close(ctx["null_source"], d["blip_null_embedding"], S.ATOL, "BLIP null embedding")
    both = torch.cat([ctx["uncond"][:, 0], ctx["cond"][:, 0]])
    S.assert_close(both, d["frame0_encoder_hidden_states"], S.ATOL, "frame 0 context")
    for i in _frames(d):  # the masks never change during sampling
        mask = torch.cat([ctx["uncond_mask"][:, i], ctx["cond_mask"][:, i]])
        S.assert_equal(mask, d[f"frame{i}_encoder_attention_mask"], f"frame {i} mask")
        # the unconditional half never changes either
        recorded_uncond = d[f"frame{i}_encoder_hidden_states"][: d["captions"].shape[0]]
        S.assert_close(ctx["uncond"][:, i], recorded_uncond, S.ATOL, f"frame {i} unconditional context")


@pytest.mark.parametrize("case", SAMPLE_CASES)
def test_steps_from_recorded_inputs(case):
    info, d = _case(case)
    model = S.parity_model().model
    g = info["guidance_scale"]
    scheduler = S.build_scheduler(info["scheduler_config"])
    for i in _frames(d):
        context = S.t(d[f"frame{i}_encoder_hidden_states"])
        mask = S.t(d[f"frame{i}_encoder_attention_mask"])
        S.assert_close(d[f"frame{i}_step_latents_in"][0], d[f"frame{i}_initial_latents"], 0.0, "start latents")
        scheduler.set_timesteps(info["num_inference_steps"])  # also resets multistep (PNDM) history
        for k, t in enumerate(scheduler.timesteps):
            latents = S.t(d[f"frame{i}_step_latents_in"][k])
            with torch.no_grad():
                out, guided = model.guided_noise(scheduler.scale_model_input(latents, t), t, context, mask, g)
            S.assert_close(out, d[f"frame{i}_step_unet_output"][k], S.ATOL, f"frame {i} step {k} UNet output")
            recorded = d[f"frame{i}_step_guided_noise"][k]
            S.assert_close(guided, recorded, S.ATOL * max(1.0, g), f"frame {i} step {k} guided noise")
            recorded_guided = S.t(d[f"frame{i}_step_guided_noise"][k])
            prev = scheduler.step(recorded_guided, t, latents, **S.step_kwargs(scheduler, info["eta"])).prev_sample
            S.assert_close(prev, d[f"frame{i}_step_latents_out"][k], S.ATOL, f"frame {i} step {k} scheduler step")


@pytest.mark.parametrize("case", SAMPLE_CASES)
def test_frame_trajectories(case):
    """``ARLDM.denoise``: whole loops from the recorded start latents and context (errors compound: 1e-4)."""
    info, d = _case(case)
    model = S.parity_model().model
    scheduler = S.build_scheduler(info["scheduler_config"])
    for i in _frames(d):
        record: dict = {}
        with torch.no_grad():
            final = model.denoise(
                S.t(d[f"frame{i}_initial_latents"]) * scheduler.init_noise_sigma,
                S.t(d[f"frame{i}_encoder_hidden_states"]),
                S.t(d[f"frame{i}_encoder_attention_mask"]),
                scheduler,
                info["num_inference_steps"],
                info["guidance_scale"],
                S.step_kwargs(scheduler, info["eta"]),
                record,
            )
        S.assert_equal(record["step_timesteps"], d[f"frame{i}_step_timesteps"], f"frame {i} timesteps")
        for key in ("step_latents_in", "step_unet_output", "step_latents_out"):
            S.assert_close(record[key], d[f"frame{i}_{key}"], S.TRAJECTORY_ATOL, f"frame {i} {key}")
        g = max(1.0, info["guidance_scale"])
        recorded = d[f"frame{i}_step_guided_noise"]
        S.assert_close(record["step_guided_noise"], recorded, S.TRAJECTORY_ATOL * g, f"frame {i} guided noise")
        S.assert_close(final, d[f"frame{i}_step_latents_out"][-1], S.TRAJECTORY_ATOL, f"frame {i} final latents")


@pytest.mark.parametrize("case", SAMPLE_CASES)
def test_vae_decode(case):
    _, d = _case(case)
    model = S.parity_model().model
    for i in _frames(d):
        final = S.t(d[f"frame{i}_step_latents_out"][-1])
        unscaled = final / model.latent_scale_factor
        S.assert_close(unscaled, d[f"frame{i}_vae_decode_input"], S.ATOL, f"frame {i} latent unscaling")
        with torch.no_grad():
            decoded = model.vae.decode(S.t(d[f"frame{i}_vae_decode_input"])).sample
            decoded_from_latents = model.decode_latents(final)
        S.assert_close(decoded, d[f"frame{i}_vae_decode_output"], S.ATOL, f"frame {i} VAE decode")
        S.assert_close(decoded_from_latents, d[f"frame{i}_vae_decode_output"], S.ATOL, f"frame {i} decode_latents")
        # uint8 conversion: exact on the recorded float output; at most 1 level off on ours (rounding boundaries)
        recorded_uint8 = to_uint8_images(S.t(d[f"frame{i}_vae_decode_output"]))
        S.assert_equal(recorded_uint8, d[f"frame{i}_images_uint8"], f"frame {i} uint8")
        assert S.max_abs(to_uint8_images(decoded), d[f"frame{i}_images_uint8"]) <= 1


@pytest.mark.parametrize("case", SAMPLE_CASES)
def test_blip_feedback_from_recorded_images(case):
    _, d = _case(case)
    model = S.parity_model().model
    size = model.mm_encoder.image_size
    caption, caption_mask = S.t(d["source_caption"]), S.t(d["source_attention_mask"])
    for i in _frames(d):
        images = S.t(d[f"frame{i}_images_uint8"])
        pixels = blip_preprocess(images, size)  # Pillow resize, as the original
        frame = i + _offset(d)
        with torch.no_grad():
            new = model.encode_history(pixels, caption[:, frame], caption_mask[:, frame])
        S.assert_close(new, d[f"frame{i}_blip_new_embedding"], S.ATOL, f"frame {i} BLIP feedback embedding")


RESIZE_CASES = [c for c in SAMPLE_CASES if "frame0_resized224_uint8" in S.meta()["sample_cases"][c]["shapes"]]


@pytest.mark.parametrize("case", RESIZE_CASES)
def test_blip_resize_matches_pil(case):
    """The default (Pillow) resize reproduces the record exactly (the optional torch path is approximate for
    some scale factors and is covered by the unit tests)."""
    _, d = _case(case)
    size = d["frame0_resized224_uint8"].shape[1]
    images = S.t(d["frame0_images_uint8"])
    S.assert_equal(blip_resize(images, size), d["frame0_resized224_uint8"], "Pillow resize")


@pytest.mark.parametrize("case", SAMPLE_CASES)
def test_context_update_rule(case):
    """Frame i+1's context = frame i's with history slot (i + src_V - V) of the conditional rows replaced by
    BLIP(generated frame i) + modal[1] + time[slot]; its caption segment is target i+1's; the unconditional
    rows never change."""
    _, d = _case(case)
    model = S.parity_model().model
    ctx = _contexts(case)
    b = d["captions"].shape[0]
    s = d["captions"].shape[-1]
    for i in list(_frames(d))[:-1]:
        frame = i + _offset(d)
        before = S.t(d[f"frame{i}_encoder_hidden_states"])
        after = S.t(d[f"frame{i + 1}_encoder_hidden_states"])
        expected = before[b:].clone()
        with torch.no_grad():
            new = model.history_update(S.t(d[f"frame{i}_blip_new_embedding"]), frame)
            expected[:, (1 + frame) * s : (2 + frame) * s] = new
        S.assert_close(expected[:, s:], after[b:, s:], S.ATOL, f"history after frame {i}")
        S.assert_close(ctx["cond"][:, i + 1, :s], after[b:, :s], S.ATOL, f"caption segment of target {i + 1}")
        S.assert_equal(after[:b], before[:b], f"unconditional context after frame {i}")


@pytest.mark.parametrize("case", SAMPLE_CASES)
def test_end_to_end_sample(case):
    """``sample()`` with the recorded start latents, checked against every record.

    Frames are fed back as uint8 images, and a few values may legitimately round the other way (README 5: the
    float decode agrees to ~1e-5, but 255·x can sit on a rounding boundary); at most 1 level, on <= 1 % of the
    values. Until such a flip has happened, everything is held to the trajectory tolerance 1e-4; once a flipped
    pixel has gone through BLIP, that feedback embedding and the later frames are compared at 1e-3 (observed
    effect of one flipped pixel: up to ~3e-4 on the history embedding). The exact feedback rule is covered
    without this effect by ``test_blip_feedback_from_recorded_images`` and ``test_context_update_rule``.
    """
    info, d = _case(case)
    model = S.parity_model().model
    scheduler = S.build_scheduler(info["scheduler_config"])
    v = d["captions"].shape[1]
    initial = torch.stack([S.t(d[f"frame{i}_initial_latents"]) for i in range(v)], dim=1)
    trace: dict = {}
    images = model.sample(
        *_batch(d),
        scheduler=scheduler,
        num_inference_steps=info["num_inference_steps"],
        guidance_scale=info["guidance_scale"],
        height=info["height"],
        width=info["width"],
        eta=info["eta"],
        initial_latents=initial,
        trace=trace,
    )
    assert images.dtype == torch.uint8
    assert tuple(images.shape) == (d["captions"].shape[0], v, info["height"], info["width"], 3)
    flipped = False  # has a generated pixel rounded differently from the record (and entered BLIP)?
    for i in range(v):
        atol = LOOSE_ATOL if flipped else S.TRAJECTORY_ATOL
        for key in ("encoder_hidden_states", "step_latents_out", "vae_decode_output"):
            S.assert_close(trace[f"frame{i}_{key}"], d[f"frame{i}_{key}"], atol, f"frame {i} {key}")
        S.assert_close(
            trace[f"frame{i}_vae_decode_input"], d[f"frame{i}_vae_decode_input"],
            atol / model.latent_scale_factor, f"frame {i} vae_decode_input",
        )
        S.assert_equal(trace[f"frame{i}_encoder_attention_mask"], d[f"frame{i}_encoder_attention_mask"], f"frame {i} mask")
        S.assert_equal(images[:, i], trace[f"frame{i}_images_uint8"], "returned images")
        diff = (images[:, i].int() - S.t(d[f"frame{i}_images_uint8"]).int()).abs()
        assert diff.max() <= 1, f"frame {i}: uint8 differs by {diff.max()}"
        assert (diff > 0).float().mean() <= 0.01, f"frame {i}: {(diff > 0).sum()} values differ"
        flipped |= bool(diff.any())
        atol = LOOSE_ATOL if flipped else S.TRAJECTORY_ATOL
        key = f"frame{i}_blip_new_embedding"
        S.assert_close(trace[key], d[key], atol, f"frame {i} BLIP feedback")
