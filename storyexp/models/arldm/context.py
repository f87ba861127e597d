"""AR-LDM's cross-attention context and its mask (pure tensor functions, no parameters).

For story b and target frame j (row r = b*V + j, story-major) the context holds src_V + 1 segments of S tokens:

    segment 0      CLIP(caption of target j)                    + modal[0]
    segment 1 + f  BLIP(source image f, source caption f)       + modal[1] + time[f]      f = 0 .. src_V-1

The mask (True = blocked) is built in three steps: (a) padding of the CLIP caption and of the src_V BERT
captions; (b) classifier-free-guidance rows are fully opened; (c) block-causal pattern OR-ed on the last V
segments: target j blocks target slots k >= j (its own slot and later ones), so frame j never sees itself.
Continuation (V = src_V - 1): frame 0 is always visible. Visualization (V = src_V): the first target sees its
caption only. diffusers wants the opposite convention (1 = keep); convert with :func:`keep_mask` at the UNet call.
"""

from __future__ import annotations

import torch


def block_causal_mask(num_targets: int, seg_len: int, device=None) -> torch.Tensor:
    """[V, V*S] bool: row j blocks the segments of targets k >= j (upper triangle incl. the diagonal)."""
    frames = torch.triu(torch.ones(num_targets, num_targets, dtype=torch.bool, device=device))
    return frames.repeat_interleave(seg_len, dim=1)


def context_mask(
    caption_mask: torch.Tensor,
    source_masks: torch.Tensor,
    cfg_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-attention mask, True = blocked, [B*V, (src_V+1)*S].

    caption_mask: [B, V, S] CLIP padding mask (1 = real token); source_masks: [B, src_V, S] BERT padding masks;
    cfg_rows: [B*V] bool, rows whose context is the unconditional one (their padding mask is opened).
    """
    b, v, s = caption_mask.shape
    src_v = source_masks.shape[1]
    if v > src_v:
        raise ValueError(f"{v} target frames but only {src_v} source frames")
    padding = torch.cat(
        [caption_mask.reshape(b * v, s), source_masks.repeat_interleave(v, dim=0).reshape(b * v, src_v * s)], dim=1
    )
    blocked = padding == 0
    if cfg_rows is not None:
        blocked = blocked & ~cfg_rows.to(blocked.device, torch.bool).view(-1, 1)
    causal = block_causal_mask(v, s, device=blocked.device).repeat(b, 1)
    return torch.cat([blocked[:, : -v * s], blocked[:, -v * s :] | causal], dim=1)


def unconditional_mask(batch: int, num_targets: int, num_sources: int, seg_len: int, device=None) -> torch.Tensor:
    """Mask of the unconditional (null) context: nothing padded, only the block-causal part. [B*V, L]."""
    open_len = (num_sources + 1 - num_targets) * seg_len
    open_part = torch.zeros(batch * num_targets, open_len, dtype=torch.bool, device=device)
    causal = block_causal_mask(num_targets, seg_len, device=device).repeat(batch, 1)
    return torch.cat([open_part, causal], dim=1)


def assemble_context(
    caption_embeds: torch.Tensor,
    source_embeds: torch.Tensor,
    modal_embeds: torch.Tensor,
    time_embeds: torch.Tensor,
    num_targets: int,
    cfg_rows: torch.Tensor | None = None,
    null_caption: torch.Tensor | None = None,
    null_source: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-attention context [B*V, (src_V+1)*S, D].

    caption_embeds: [B*V, S, D] CLIP states of the target captions (story-major rows);
    source_embeds: [B*src_V, S, D] BLIP multimodal states of the source frames;
    modal_embeds: [2, D]; time_embeds: [>= src_V, D];
    cfg_rows ([B*V] bool) with null_caption / null_source ([1, S, D]): for those rows the CLIP segment and *all*
    BLIP segments are replaced by the null embeddings *before* the modal and time rows are added.
    """
    n, s, d = caption_embeds.shape
    v = num_targets
    b = n // v
    src_v = source_embeds.shape[0] // b
    if time_embeds.shape[0] < src_v:
        raise ValueError(f"time embedding table has {time_embeds.shape[0]} rows, {src_v} source frames given")
    sources = source_embeds.reshape(b, 1, src_v, s, d).expand(b, v, src_v, s, d).reshape(n, src_v, s, d)
    captions = caption_embeds
    if cfg_rows is not None and bool(cfg_rows.any()):
        rows = cfg_rows.to(caption_embeds.device, torch.bool)
        captions = torch.where(rows.view(n, 1, 1), null_caption.expand(n, s, d), captions)
        sources = torch.where(rows.view(n, 1, 1, 1), null_source.expand(n, src_v, s, d), sources)
    captions = captions + modal_embeds[0]
    sources = sources + modal_embeds[1] + time_embeds[:src_v].view(1, src_v, 1, d)
    return torch.cat([captions, sources.reshape(n, src_v * s, d)], dim=1)


def keep_mask(blocked: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """AR-LDM mask (True = blocked) -> diffusers' ``encoder_attention_mask`` (1 = keep, 0 = discard)."""
    return (~blocked).to(dtype)
