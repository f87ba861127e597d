"""AR-LDM network: a latent-diffusion UNet whose cross-attention context is CLIP(caption) + BLIP(history).

Plain ``torch.nn``; tokenisation, image pre-processing, optimisers and freezing live in the Lightning system.

Tensor contract (B stories, V target frames, src_V source frames, S tokens):

* ``images``            [B, V, 3, H, W] float in [-1, 1] — the target frames (VAE input).
* ``captions``          [B, V, S] int64 CLIP ids of the target captions, ``attention_mask`` [B, V, S] (1 = token).
* ``source_images``     [B, src_V, 3, Hb, Wb] BLIP-normalised frames (see ``blip.blip_preprocess``).
* ``source_caption``    [B, src_V, S] int64 BERT ids ([CLS] first), ``source_attention_mask`` [B, src_V, S].

Continuation: V = 4 targets (frames 1..4), src_V = 5. Visualization: V = 5 = src_V. In general target j is
source frame j + src_V - V. Rows are story-major everywhere (row = b*V + j).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
)
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from storyexp.utils.images import uint8_from_zero_one

from .blip import BlipMultimodalEncoder, blip_null_image, blip_preprocess
from .context import assemble_context, context_mask, keep_mask, unconditional_mask

# Attention processors of diffusers that apply ``attention_mask`` in cross-attention. The original AR-LDM had
# an xformers path that silently dropped the mask (future frames leaked); we refuse any processor not known to
# honour it instead of trusting it.
MASK_AWARE_PROCESSORS = (
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
)

# Stable Diffusion's training schedule, used by AR-LDM.
SD_NOISE_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)


@dataclasses.dataclass
class TrainingStepOutput:
    """Loss of one AR-LDM training step plus the intermediates (for logging and parity checks)."""

    loss: torch.Tensor
    noise_pred: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy_latents: torch.Tensor
    latents: torch.Tensor  # scaled latents (x0 of the diffusion)
    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    encoder_hidden_states: torch.Tensor
    encoder_attention_mask: torch.Tensor  # True = blocked
    cfg_rows: torch.Tensor
    caption_embeds: torch.Tensor
    source_embeds: torch.Tensor
    null_caption: torch.Tensor
    null_source: torch.Tensor


@dataclasses.dataclass(frozen=True)
class SamplingContexts:
    """Cross-attention inputs of all V targets while sampling: contexts [B, V, L, D], masks [B, V, L] (True = blocked).

    Only ``cond`` changes while sampling: the feedback writes each generated frame into its history
    (:meth:`with_history`). The unconditional context and both masks stay as built; future frames are hidden by
    the masks, so their placeholder history never matters.
    """

    cond: torch.Tensor
    uncond: torch.Tensor
    cond_mask: torch.Tensor
    uncond_mask: torch.Tensor

    def frame(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Target i's classifier-free-guidance batch: context [2B, L, D] and mask [2B, L], unconditional rows first."""
        context = torch.cat([self.uncond[:, i], self.cond[:, i]], dim=0)
        blocked = torch.cat([self.uncond_mask[:, i], self.cond_mask[:, i]], dim=0)
        return context, blocked

    def with_history(self, slot: int, segment: torch.Tensor) -> SamplingContexts:
        """A copy whose conditional context holds ``segment`` [B, S, D] in history slot ``slot`` of every target.

        A copy rather than an in-place write, so the contexts a caller holds never change under it.
        """
        s = segment.shape[1]
        cond = self.cond.clone()
        cond[:, :, (1 + slot) * s : (2 + slot) * s] = segment.unsqueeze(1)
        return dataclasses.replace(self, cond=cond)


def scheduler_step_kwargs(scheduler, eta: float, generator: torch.Generator | None) -> dict:
    """Extra arguments for ``scheduler.step``: ``eta`` where it takes one (DDIM), and ``generator`` where it draws
    noise (DDPM, DDIM with eta > 0, ancestral samplers), so that a seeded sample is reproducible."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def _rand(shape, generator, device) -> torch.Tensor:
    """Uniform [0, 1) drawn on the generator's device (so a CPU generator also works for CUDA tensors); a list of
    generators draws row i from generator i (one per story row, like diffusers' `randn_tensor`)."""
    if isinstance(generator, list):
        return torch.cat([_rand((1, *shape[1:]), g, device) for g in generator])
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _randint(high, shape, generator, device) -> torch.Tensor:
    if isinstance(generator, list):
        return torch.cat([_randint(high, (1, *shape[1:]), g, device) for g in generator])
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, high, shape, generator=generator, device=gen_device).to(device)


def _param_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's first parameter (what its outputs are computed in), float32 without parameters."""
    return next((p.dtype for p in module.parameters()), torch.float32)


def check_attention_processors(unet: UNet2DConditionModel) -> None:
    """Refuse attention processors that might drop the cross-attention mask (future frames would leak)."""
    for name, proc in unet.attn_processors.items():
        if name.endswith("attn2.processor") and not isinstance(proc, MASK_AWARE_PROCESSORS):
            raise RuntimeError(
                f"UNet attention processor {type(proc).__name__} at {name} is not known to apply the "
                "cross-attention mask; AR-LDM needs the mask (it hides future frames). Use one of "
                + ", ".join(p.__name__ for p in MASK_AWARE_PROCESSORS)
            )


def masked_unet_forward(
    unet: UNet2DConditionModel, latents: torch.Tensor, timesteps, context: torch.Tensor, blocked: torch.Tensor | None
) -> torch.Tensor:
    """Call a diffusers UNet with AR-LDM's mask (True = blocked), converted to diffusers' keep-mask only here.

    diffusers turns the keep-mask into an additive -10000 bias on discarded positions, which equals the
    original's -inf masking in float32 for every row with at least one visible position (AR-LDM rows always
    see their caption's first token).
    """
    check_attention_processors(unet)
    mask = None if blocked is None else keep_mask(blocked.to(latents.device), latents.dtype)
    return unet(latents, timesteps, context, encoder_attention_mask=mask).sample


def to_uint8_images(decoded: torch.Tensor) -> torch.Tensor:
    """VAE output [N, 3, H, W] in about [-1, 1] -> uint8 [N, H, W, 3]: round(255 * clamp(x/2 + 0.5, 0, 1))."""
    return uint8_from_zero_one(decoded.float() / 2 + 0.5)


class ARLDM(nn.Module):
    """AR-LDM: UNet + frozen VAE + CLIP text encoder + BLIP multimodal encoder + modal/time embeddings.

    Args:
        unet: diffusers ``UNet2DConditionModel`` with ``cross_attention_dim`` = D.
        vae: diffusers ``AutoencoderKL`` or :class:`PixelAutoencoder`; always frozen and in eval mode.
        text_encoder: transformers ``CLIPTextModel`` of width D, position table >= S.
        mm_encoder: :class:`BlipMultimodalEncoder` of width D.
        clip_text_null_token / blip_text_null_token: [1, S] ids of the empty caption padded to S.
        n_frames: rows of the time-embedding table (>= src_V; 5 in the original).
        noise_scheduler: training ``DDPMScheduler`` (SD's scaled-linear schedule if None).
        latent_scale_factor: latent scaling (``vae.config.scaling_factor`` if None, 0.18215 for SD).
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: nn.Module,
        text_encoder: nn.Module,
        mm_encoder: BlipMultimodalEncoder,
        clip_text_null_token: torch.Tensor,
        blip_text_null_token: torch.Tensor,
        n_frames: int = 5,
        noise_scheduler: DDPMScheduler | None = None,
        latent_scale_factor: float | None = None,
    ):
        super().__init__()
        width = unet.config.cross_attention_dim
        for name, w in (("text_encoder", text_encoder.config.hidden_size), ("mm_encoder", mm_encoder.hidden_size)):
            if w != width:
                raise ValueError(f"{name} width {w} differs from the UNet's cross_attention_dim {width}")
        if clip_text_null_token.shape != blip_text_null_token.shape or clip_text_null_token.dim() != 2:
            raise ValueError("clip_text_null_token and blip_text_null_token must both be [1, S]")
        s = clip_text_null_token.shape[1]
        for name, positions in (
            ("CLIP position table", text_encoder.config.max_position_embeddings),
            ("BLIP text position table", mm_encoder.config.text_max_positions),
        ):
            if positions < s:
                raise ValueError(f"{name} has {positions} rows, fewer than max_length S={s}")
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.mm_encoder = mm_encoder
        self.modal_type_embeddings = nn.Embedding(2, width)
        self.time_embeddings = nn.Embedding(n_frames, width)
        self.register_buffer("clip_text_null_token", clip_text_null_token.long().clone())
        self.register_buffer("blip_text_null_token", blip_text_null_token.long().clone())
        self.register_buffer("blip_image_null_token", blip_null_image(mm_encoder.image_size))
        self.noise_scheduler = noise_scheduler or DDPMScheduler(**SD_NOISE_SCHEDULER)
        if latent_scale_factor is None:
            latent_scale_factor = getattr(vae.config, "scaling_factor", None) or 0.18215
        self.latent_scale_factor = float(latent_scale_factor)
        self.vae.requires_grad_(False)
        self.vae.eval()
        self.channels_last = False  # `use_channels_last`

    # ---------------------------------------------------------------- memory format

    def use_channels_last(self, enabled: bool = True) -> None:
        """Keep the UNet's and the VAE's 4-d weights in ``torch.channels_last`` (NHWC) and make the latents fed to them
        channels-last where they are created (start latents, training latents), so their convolutions run NHWC
        kernels (cuDNN / oneDNN pick them for channels-last inputs and weights). ``enabled=False`` goes back to the
        default contiguous format.

        Only strides change: parameter and buffer values, state-dict keys and the computed function are the same
        (outputs to float rounding: another kernel sums in another order). Copying weights in (``load_state_dict``)
        and moving the model (``.to(device / dtype)``) keep the format.
        """
        fmt = torch.channels_last if enabled else torch.contiguous_format
        for part in (self.unet, self.vae):
            part.to(memory_format=fmt)
        self.channels_last = bool(enabled)

    def _in_memory_format(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [N, C, h, w] channels-last contiguous when `use_channels_last` is on, else as it is."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    # ---------------------------------------------------------------- sizes

    @property
    def max_length(self) -> int:
        return self.clip_text_null_token.shape[1]

    @property
    def width(self) -> int:
        return self.modal_type_embeddings.embedding_dim

    @property
    def vae_downsampling(self) -> int:
        factor = getattr(self.vae.config, "downsampling_factor", None)
        return int(factor) if factor else 2 ** (len(self.vae.config.block_out_channels) - 1)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # the VAE is frozen: never let it switch to train mode
        return self

    # ---------------------------------------------------------------- encoders

    def encode_captions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """CLIP ``last_hidden_state`` of [N, S] ids (padding masked when a mask is given)."""
        return self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def encode_history(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """BLIP multimodal states [N, S, D] of (image, caption) pairs."""
        return self.mm_encoder(pixel_values, input_ids, attention_mask)

    def encode_batch(
        self,
        captions: torch.Tensor,
        attention_mask: torch.Tensor,
        source_images: torch.Tensor,
        source_caption: torch.Tensor,
        source_attention_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP states of the target captions [B*V, S, D] and BLIP states of the source frames [B*src_V, S, D]."""
        s = captions.shape[-1]
        caption_embeds = self.encode_captions(captions.reshape(-1, s), attention_mask.reshape(-1, s))
        source_embeds = self.encode_history(
            source_images.flatten(0, 1), source_caption.reshape(-1, s), source_attention_mask.reshape(-1, s)
        )
        return caption_embeds, source_embeds

    def null_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLIP of the empty caption without mask, BLIP of black image + empty caption without mask), [1, S, D].

        Recomputed through the (possibly trainable) encoders each time, as in the original.
        """
        null_caption = self.encode_captions(self.clip_text_null_token, None)
        null_source = self.encode_history(self.blip_image_null_token, self.blip_text_null_token, None)
        return null_caption, null_source

    # ---------------------------------------------------------------- UNet

    def unet_forward(
        self, latents: torch.Tensor, timesteps, context: torch.Tensor, blocked: torch.Tensor | None
    ) -> torch.Tensor:
        """UNet ε prediction with AR-LDM's mask (True = blocked)."""
        return masked_unet_forward(self.unet, latents, timesteps, context, blocked)

    # ---------------------------------------------------------------- training

    def training_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet regresses: ε for AR-LDM (``prediction_type="epsilon"``, the default and the original).

        ``v_prediction`` and ``sample`` (x0) follow the noise scheduler's ``prediction_type``, so a small model
        trained from scratch (the CPU demo) can use a parameterisation that learns faster; the samplers read the
        same setting from the scheduler config, so training and sampling always agree.
        """
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        if kind == "sample":
            return latents
        raise ValueError(f"unsupported prediction_type {kind!r}: expected epsilon, v_prediction or sample")

    def training_loss(
        self,
        images: torch.Tensor,
        captions: torch.Tensor,
        attention_mask: torch.Tensor,
        source_images: torch.Tensor,
        source_caption: torch.Tensor,
        source_attention_mask: torch.Tensor,
        cfg_rows: torch.Tensor | None = None,
        cfg_prob: float = 0.1,
        posterior_eps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        posterior_moments: tuple[torch.Tensor, torch.Tensor] | None = None,
        caption_embeds: torch.Tensor | None = None,
        source_embeds: torch.Tensor | None = None,
        null_caption: torch.Tensor | None = None,
        null_source: torch.Tensor | None = None,
    ) -> TrainingStepOutput:
        """One teacher-forced training step (ε-prediction MSE). Shapes: see the module docstring.

        Random draws (each injectable, else drawn from ``generator``): ``cfg_rows`` [B*V] bool (each row replaced
        by the unconditional context with probability ``cfg_prob``), ``posterior_eps`` (VAE posterior sample =
        mean + std * eps), ``noise`` and ``timesteps`` [B*V] (uniform over the training schedule).
        ``posterior_moments``: the frozen VAE's (mean, std) [B*V, C, h, w] of ``images``, precomputed; the VAE is
        then not run (the eps is drawn the same way, so the step is the same).
        ``caption_embeds`` [B*V, S, D] / ``source_embeds`` [B*src_V, S, D]: a wholly frozen CLIP's states of the
        target captions / a wholly frozen BLIP's states of the source frames (what :meth:`encode_batch` returns),
        precomputed; that encoder is then not run on the batch (``source_images`` may be None with
        ``source_embeds``). ``null_caption`` / ``null_source`` [1, S, D]: the (constant) null embeddings of a
        frozen encoder, computed once instead of every step. Each one given replaces exactly its live
        computation, in the same order, so the live path is unchanged.
        """
        b, v = captions.shape[:2]
        n = b * v
        device = images.device
        self._check_lengths(captions, source_caption)

        s = captions.shape[-1]
        if caption_embeds is None:  # the order of the encoder calls is encode_batch's, then null_embeddings'
            caption_embeds = self.encode_captions(captions.reshape(-1, s), attention_mask.reshape(-1, s))
        else:
            caption_embeds = caption_embeds.to(device=device, dtype=_param_dtype(self.text_encoder))
        if source_embeds is None:
            if source_images is None:
                raise ValueError("source_images are needed unless source_embeds are given")
            source_embeds = self.encode_history(
                source_images.flatten(0, 1), source_caption.reshape(-1, s), source_attention_mask.reshape(-1, s)
            )
        else:
            source_embeds = source_embeds.to(device=device, dtype=_param_dtype(self.mm_encoder))
        if null_caption is None:
            null_caption = self.encode_captions(self.clip_text_null_token, None)
        if null_source is None:
            null_source = self.encode_history(self.blip_image_null_token, self.blip_text_null_token, None)
        if cfg_rows is None:
            cfg_rows = _rand((n,), generator, device) < cfg_prob
        cfg_rows = cfg_rows.to(device=device, dtype=torch.bool).reshape(n)
        context = assemble_context(
            caption_embeds,
            source_embeds,
            self.modal_type_embeddings.weight,
            self.time_embeddings.weight,
            v,
            cfg_rows,
            null_caption,
            null_source,
        )
        blocked = context_mask(attention_mask, source_attention_mask, cfg_rows)

        with torch.no_grad():
            if posterior_moments is None:
                pixels = self._in_memory_format(images.flatten(0, 1).to(self.vae_dtype))
                posterior = self.vae.encode(pixels).latent_dist
                mean, std = posterior.mean, posterior.std
            else:
                mean, std = (m.to(device=device, dtype=self.vae_dtype) for m in posterior_moments)
            if posterior_eps is None:
                posterior_eps = randn_tensor(mean.shape, generator=generator, device=device, dtype=mean.dtype)
            latents = (mean + std * posterior_eps.to(mean)) * self.latent_scale_factor
        latents = latents.to(self.unet.dtype)
        if noise is None:
            noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        if timesteps is None:
            timesteps = _randint(self.noise_scheduler.config.num_train_timesteps, (n,), generator, device)
        timesteps = timesteps.to(device=device, dtype=torch.long)
        noisy = self._in_memory_format(self.noise_scheduler.add_noise(latents, noise, timesteps))
        noise_pred = self.unet_forward(noisy, timesteps, context.to(self.unet.dtype), blocked)
        target = self.training_target(latents, noise, timesteps)
        # mean over C, H, W then over rows (= the overall mean, all rows having the same size)
        loss = F.mse_loss(noise_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)).mean()
        return TrainingStepOutput(
            loss=loss,
            noise_pred=noise_pred,
            noise=noise,
            timesteps=timesteps,
            noisy_latents=noisy,
            latents=latents,
            latent_mean=mean,
            latent_std=std,
            encoder_hidden_states=context,
            encoder_attention_mask=blocked,
            cfg_rows=cfg_rows,
            caption_embeds=caption_embeds,
            source_embeds=source_embeds,
            null_caption=null_caption,
            null_source=null_source,
        )

    @property
    def vae_dtype(self) -> torch.dtype:
        params = list(self.vae.parameters())
        return params[0].dtype if params else self.unet.dtype

    def _check_lengths(self, captions: torch.Tensor, source_caption: torch.Tensor) -> None:
        s = self.max_length
        if captions.shape[-1] != s or source_caption.shape[-1] != s:
            raise ValueError(
                f"captions must be padded to max_length={s} tokens, got {captions.shape[-1]} (CLIP) and "
                f"{source_caption.shape[-1]} (BERT)"
            )

    # ---------------------------------------------------------------- sampling
    #
    # ``sample`` is a short composition of the public steps below; a custom loop (or a test) can drive them one
    # by one and look at every intermediate without the sampler knowing about it.

    @property
    def _device(self) -> torch.device:
        return self.modal_type_embeddings.weight.device

    def sampling_contexts(
        self,
        captions: torch.Tensor,
        attention_mask: torch.Tensor,
        source_images: torch.Tensor,
        source_caption: torch.Tensor,
        source_attention_mask: torch.Tensor,
    ) -> SamplingContexts:
        """Conditional and unconditional contexts of all targets before any frame is generated."""
        b, v, s = captions.shape
        src_v = source_images.shape[1]
        n = b * v
        caption_embeds, source_embeds = self.encode_batch(
            captions, attention_mask, source_images, source_caption, source_attention_mask
        )
        null_caption, null_source = self.null_embeddings()
        modal, time = self.modal_type_embeddings.weight, self.time_embeddings.weight
        cond = assemble_context(caption_embeds, source_embeds, modal, time, v)
        all_rows = torch.ones(n, dtype=torch.bool, device=cond.device)
        uncond = assemble_context(caption_embeds, source_embeds, modal, time, v, all_rows, null_caption, null_source)
        cond_mask = context_mask(attention_mask, source_attention_mask)
        uncond_mask = unconditional_mask(b, v, src_v, s, device=cond.device)
        shape = (b, v) + cond.shape[1:]
        return SamplingContexts(
            cond=cond.reshape(shape),
            uncond=uncond.reshape(shape),
            cond_mask=cond_mask.reshape(b, v, -1),
            uncond_mask=uncond_mask.reshape(b, v, -1),
        )

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        """[B, C, h, w] of one frame's latents for images of height x width."""
        f = self.vae_downsampling
        if height % f or width % f:
            raise ValueError(f"height/width must be multiples of the VAE factor {f}, got {height}x{width}")
        return (batch, self.unet.config.in_channels, height // f, width // f)

    def start_latents(
        self,
        shape: tuple[int, ...],
        scheduler,
        generator: torch.Generator | None = None,
        given: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One frame's start latents: ``given`` [B, C, h, w], else N(0, I) of ``shape`` drawn from ``generator``;
        scaled by ``scheduler.init_noise_sigma`` (1 for DDIM/PNDM, > 1 for the Euler family); channels-last with
        `use_channels_last` (the same values)."""
        if given is not None:
            latents = given.to(device=self._device, dtype=self.unet.dtype)
        else:
            latents = randn_tensor(shape, generator=generator, device=self._device, dtype=self.unet.dtype)
        return self._in_memory_format(latents * scheduler.init_noise_sigma)

    def cfg_noise_pred(self, latents: torch.Tensor, t, context: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        """UNet output [2B, ...] for [latents; latents] with the CFG batch of :meth:`SamplingContexts.frame`
        (``context`` [2B, L, D] / ``blocked`` [2B, L], unconditional half first)."""
        return self.unet_forward(torch.cat([latents, latents], dim=0), t, context, blocked)

    @staticmethod
    def guide(noise_pred: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """Classifier-free guidance of a [2B, ...] :meth:`cfg_noise_pred` output: ε_u + g (ε_c − ε_u), [B, ...]."""
        eps_uncond, eps_cond = noise_pred.chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    def denoising_step(
        self,
        latents: torch.Tensor,
        t,
        context: torch.Tensor,
        blocked: torch.Tensor,
        scheduler,
        guidance_scale: float,
        step_kwargs: dict | None = None,
    ) -> torch.Tensor:
        """One guided scheduler step at timestep ``t``: latents [B, C, h, w] -> the scheduler's ``prev_sample``."""
        noise_pred = self.cfg_noise_pred(scheduler.scale_model_input(latents, t), t, context, blocked)
        return scheduler.step(self.guide(noise_pred, guidance_scale), t, latents, **(step_kwargs or {})).prev_sample

    def denoise(
        self,
        latents: torch.Tensor,
        context: torch.Tensor,
        blocked: torch.Tensor,
        scheduler,
        num_inference_steps: int,
        guidance_scale: float,
        step_kwargs: dict | None = None,
    ) -> torch.Tensor:
        """One frame's guided denoising loop from start latents [B, C, h, w]; returns the final latents.

        ``set_timesteps`` is called here, for every frame, because it also resets multistep state (PNDM, DPM).
        """
        scheduler.set_timesteps(num_inference_steps, device=latents.device)
        for t in scheduler.timesteps:
            latents = self.denoising_step(latents, t, context, blocked, scheduler, guidance_scale, step_kwargs)
        return latents

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents -> VAE decoder output (float, about [-1, 1])."""
        return self.vae.decode((latents / self.latent_scale_factor).to(self.vae_dtype)).sample

    def encode_generated(
        self,
        images: torch.Tensor,
        caption: torch.Tensor,
        caption_mask: torch.Tensor,
        dtype: torch.dtype = torch.float32,
        blip_resize_backend: str = "pil",
    ) -> torch.Tensor:
        """BLIP states [B, S, D] of generated uint8 frames [B, H, W, 3] with the BERT caption [B, S] of their frame.

        This is what the feedback writes into the history (before :meth:`history_update`). ``dtype``: dtype of
        the BLIP input pixels; ``sample`` uses the context's, the dtype the history is kept in.
        """
        pixels = blip_preprocess(
            images, self.mm_encoder.image_size, device=self._device, dtype=dtype, backend=blip_resize_backend
        )
        return self.encode_history(pixels, caption, caption_mask)

    def history_update(self, new_embeds: torch.Tensor, frame: int) -> torch.Tensor:
        """What the feedback writes into history slot ``frame``: BLIP states + modal[1] + time[frame]."""
        return new_embeds + self.modal_type_embeddings.weight[1] + self.time_embeddings.weight[frame]

    @torch.no_grad()
    def sample(
        self,
        captions: torch.Tensor,
        attention_mask: torch.Tensor,
        source_images: torch.Tensor,
        source_caption: torch.Tensor,
        source_attention_mask: torch.Tensor,
        scheduler,
        num_inference_steps: int = 50,
        guidance_scale: float = 6.0,
        height: int = 512,
        width: int = 512,
        eta: float = 0.0,
        blip_resize_backend: str = "pil",
        initial_latents: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        skip_unread_feedback: bool = True,
        on_frames: Callable[[int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Auto-regressive guided sampling of all V target frames; returns uint8 [B, V, height, width, 3].

        Frame by frame: denoise with CFG on [unconditional; conditional] contexts, decode, then encode the
        generated image with BLIP together with the ground-truth BERT caption of its frame and write the result
        (+ modal[1] + time[f]) into history slot f of the conditional context (f = i + src_V − V); the
        unconditional context is never updated and the masks never change. Source images of target frames are
        only placeholders: they stay masked until replaced by generated frames.

        ``scheduler``: any diffusers scheduler (its ``set_timesteps`` is called for every frame, which also
        resets multistep state); ``eta`` is passed where the scheduler's ``step`` takes it.
        ``initial_latents``: optional [B, V, C, h, w] start latents (else N(0, I) from ``generator``), scaled by
        ``scheduler.init_noise_sigma``. ``blip_resize_backend``: "pil" (the original's resize, exact) or "torch"
        (see ``blip.blip_resize``). ``skip_unread_feedback``: the last target's feedback (BLIP on the last generated
        frame, written into a history slot no frame reads) is skipped, one BLIP forward fewer and the same frames;
        False runs it as the original did.
        ``on_frames``: optional plain callable, ``on_frames(i, uint8 [B, height, width, 3])`` right after target
        frame i is decoded, before its feedback: the very tensor that becomes ``[:, i]`` of the result (so a listener
        needs no second decode; it must not modify it). It only observes: the frames are the same without it.

        The steps (:meth:`sampling_contexts`, :meth:`SamplingContexts.frame`, :meth:`start_latents`,
        :meth:`denoise`, :meth:`decode_latents`, :meth:`encode_generated`, :meth:`history_update`,
        :meth:`SamplingContexts.with_history`) are public, for loops that need the intermediates.
        """
        b, v = captions.shape[:2]
        offset = source_images.shape[1] - v  # target i is source frame i + offset
        self._check_lengths(captions, source_caption)
        shape = self.latent_shape(b, height, width)
        contexts = self.sampling_contexts(
            captions, attention_mask, source_images, source_caption, source_attention_mask
        )
        step_kwargs = scheduler_step_kwargs(scheduler, eta, generator)

        frames = []
        for i in range(v):
            context, blocked = contexts.frame(i)
            # Start latents are drawn here, frame by frame, between the scheduler draws of the frames: this order
            # of draws from `generator` is what a seed reproduces.
            given = None if initial_latents is None else initial_latents[:, i]
            latents = self.start_latents(shape, scheduler, generator, given)
            latents = self.denoise(
                latents, context.to(self.unet.dtype), blocked, scheduler, num_inference_steps, guidance_scale,
                step_kwargs,
            )
            images = to_uint8_images(self.decode_latents(latents))
            frames.append(images)
            if on_frames is not None:
                on_frames(i, images)

            # Feedback: the generated frame, with the ground-truth caption of its frame, becomes history slot
            # `slot` of the conditional context. The original does it for the last target too, although no frame
            # reads that slot (and no random draw happens in it): skipped unless skip_unread_feedback=False.
            if skip_unread_feedback and i == v - 1:
                break
            slot = i + offset
            new = self.encode_generated(
                images, source_caption[:, slot], source_attention_mask[:, slot], contexts.cond.dtype,
                blip_resize_backend,
            )
            contexts = contexts.with_history(slot, self.history_update(new, slot))
        return torch.stack(frames, dim=1)
