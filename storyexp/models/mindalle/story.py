"""StoryDALL-E on the minDALL-E backbone: `StoryDalleNet`, its KV-cached frame sampler, the checkpoint loader.

`StoryDalleNet` wraps (composes) a `Transformer1d` as `self.stage2` and adds, under the released checkpoint's names:

- `story_linear` (Linear sent_embed -> embed_dim) and `story_block` (one pre-LN `Block`, causal over the L frames):
  one story token per frame, prepended to that frame's caption;
- optional prompt prefix (`--prompt` in the original): `wte` (Embedding preseqlen) -> `control_trans`
  (Linear-Tanh-Linear) -> dropout, prepended before the story token;
- "retro" cross-attention layers `cross_attn.<j>` after the self-attention of blocks 2, 5, 8, ... (j = (i+1)//3 - 1),
  keys/values from the source frame's codes embedded with the shared `tok_emb_img` + `pos_emb_img`, applied only at
  the positions that predict image tokens. Unlike the original they are REGISTERED (trained and saved), and by default
  gated by `tanh(gate)` with gate initialised to 0, so an untrained net computes exactly the backbone's function.

Sequence per frame: `[prompt (P) ; caption (N) ; image codes (T)]`, one causal mask; the prompt reuses
`pos_emb_txt[0..P-1]`. Image token t is predicted at position P+N-1+t; text token n+1 at position P+n.

Shapes: a batch holds B stories of L frames: texts [B, L, N], images [B, L, T], source_codes [B, S] (one source per
story, shared by its L frames), sentence_embeds [B, L, sent_embed]. Frames are flattened to B*L sequences.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from storyexp.models.draws import Generators, multinomial
from storyexp.models.story_frames import OnFrames, sample_story_frames
from storyexp.utils.loading import check_state_dict

from .sampling import next_code_probs
from .transformer import AttentionProjections, Block, KVCache, Stage2Config, StaticKVCache, Transformer1d

GATE_INITS = ("zero", "none")


def cross_attn_block_indices(n_layers: int, every: int = 3) -> list[int]:
    """Blocks that carry a cross-attention layer: 2, 5, 8, ... < n_layers (the original's `range(2, 42, 3)`)."""
    return list(range(every - 1, n_layers, every))


class CrossAttention(AttentionProjections):
    """Multi-head attention from x (queries) to a source sequence (keys/values), no mask over the source."""

    def source_kv(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """The source's keys and values [B, nh, S, hd] (constant while a frame is sampled: computed once)."""
        B, S, C = src.shape
        split = lambda t: t.view(B, S, self.n_heads, C // self.n_heads).transpose(1, 2)  # noqa: E731
        return split(self.key(src)), split(self.value(src))

    def forward(self, x: Tensor, src: Tensor | None = None, kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x [B, T, C] attends to src [B, S, C], or to its precomputed `source_kv(src)`."""
        B, T, C = x.shape
        h = self.n_heads
        q = self.query(x).view(B, T, h, C // h).transpose(1, 2)
        k, v = self.source_kv(src) if kv is None else kv
        y = self.attend(q, k, v)  # fused or explicit: model.network.fused_attention
        return self.resid_drop(self.proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class CrossAttentionLayer(nn.Module):
    """`tanh(gate) * CrossAttn(ln1(x), ln2(src))` (gate_init="zero") or the ungated original (gate_init="none")."""

    def __init__(self, cfg: Stage2Config, gate_init: str = "zero"):
        super().__init__()
        if gate_init not in GATE_INITS:
            raise ValueError(f"gate_init must be one of {GATE_INITS}, got {gate_init!r}")
        self.ln1 = nn.LayerNorm(cfg.embed_dim)
        self.ln2 = nn.LayerNorm(cfg.embed_dim)
        self.attn = CrossAttention(cfg)
        self.gate = nn.Parameter(torch.zeros(())) if gate_init == "zero" else None

    def source_kv(self, src: Tensor) -> tuple[Tensor, Tensor]:
        return self.attn.source_kv(self.ln2(src))

    def forward(self, x: Tensor, src: Tensor | None = None, kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """src [B, S, C], or kv = `source_kv(src)` computed once for many calls with the same source."""
        y = self.attn(self.ln1(x), kv=self.source_kv(src) if kv is None else kv)
        return y if self.gate is None else torch.tanh(self.gate) * y


class StoryDalleNet(nn.Module):
    def __init__(
        self,
        cfg: Stage2Config,
        *,
        story_len: int = 4,
        sent_embed: int = 512,
        condition: bool = True,
        gate_init: str = "zero",
        prompt: bool = False,
        preseqlen: int = 32,
        prefix_dropout: float = 0.2,
        cross_every: int = 3,
    ):
        super().__init__()
        cfg = dataclasses.replace(cfg)  # private copy: grow_text_vocab mutates vocab_size_txt
        self.story_len, self.sent_embed = story_len, sent_embed
        self.prompt, self.preseqlen = prompt, preseqlen
        self.prompt_len = (preseqlen if prompt else 0) + 1
        if self.prompt_len > cfg.ctx_len_txt:
            raise ValueError(f"prompt length {self.prompt_len} > ctx_len_txt {cfg.ctx_len_txt} (shares pos_emb_txt)")
        self.stage2 = Transformer1d(cfg)
        # The causal masks of the backbone cover ctx_len only; the prompt makes sequences P longer. The mask is a
        # non-persistent buffer, so enlarging it changes no checkpoint key.
        full = cfg.ctx_len + self.prompt_len
        for blk in self.stage2.blocks:
            blk.attn.register_buffer("mask", torch.tril(torch.ones(full, full, dtype=torch.bool)), persistent=False)

        self.story_linear = nn.Linear(sent_embed, cfg.embed_dim)
        self.story_block = Block(dataclasses.replace(cfg, ctx_len_txt=story_len, ctx_len_img=0))
        if prompt:
            self.wte = nn.Embedding(preseqlen, cfg.embed_dim)
            self.control_trans = nn.Sequential(
                nn.Linear(cfg.embed_dim, cfg.embed_dim), nn.Tanh(), nn.Linear(cfg.embed_dim, cfg.embed_dim)
            )
            self.prefix_drop = nn.Dropout(prefix_dropout)
        for m in [self.story_linear, self.story_block] + ([self.wte, self.control_trans] if prompt else []):
            m.apply(Transformer1d._init_weights)

        self.cross_blocks = cross_attn_block_indices(cfg.n_layers, cross_every) if condition else []
        # block index -> cross-attention layer index (the original's int((i+1)/3 - 1) for every=3)
        self._cross_of = {b: j for j, b in enumerate(self.cross_blocks)}
        # PyTorch default Linear init, as the original's layers (they are gated to zero by default anyway).
        self.cross_attn = nn.ModuleList([CrossAttentionLayer(cfg, gate_init) for _ in self.cross_blocks])

    @property
    def cfg(self) -> Stage2Config:
        return self.stage2.cfg

    # ------------------------------------------------------------------ vocabulary
    def grow_text_vocab(self, n_new: int) -> int:
        """Append `n_new` rows (N(0, 0.02)) to `tok_emb_txt` and `head_txt`, old rows copied. Returns the new size."""
        if n_new < 0:
            raise ValueError(f"n_new must be >= 0, got {n_new}")
        return self._set_text_vocab(self.cfg.vocab_size_txt + n_new)

    def _set_text_vocab(self, size: int) -> int:
        old_emb = self.stage2.tok_emb_txt
        keep = min(size, old_emb.num_embeddings)
        w = old_emb.weight
        emb = nn.Embedding(size, w.shape[1], device=w.device, dtype=w.dtype)
        nn.init.normal_(emb.weight, 0.0, 0.02)
        with torch.no_grad():
            emb.weight[:keep] = w[:keep]
        emb.weight.requires_grad_(w.requires_grad)
        self.stage2.tok_emb_txt = emb
        if getattr(self.stage2, "head_txt", None) is not None:
            hw = self.stage2.head_txt.weight
            head = nn.Linear(hw.shape[1], size, bias=False, device=hw.device, dtype=hw.dtype)
            nn.init.normal_(head.weight, 0.0, 0.02)
            with torch.no_grad():
                head.weight[:keep] = hw[:keep]
            head.weight.requires_grad_(hw.requires_grad)
            self.stage2.head_txt = head
        self.cfg.vocab_size_txt = size
        return size

    # ------------------------------------------------------------------ embeddings
    def story_embeddings(self, sentence_embeds: Tensor) -> Tensor:
        """[B, L, sent_embed] -> [B*L, P, D]: per frame, the (optional) prompt prefix then its story token."""
        B, L, _ = sentence_embeds.shape
        if L > self.story_len:
            raise ValueError(f"{L} frames > story_len {self.story_len}")
        story, _ = self.story_block(self.story_linear(sentence_embeds))  # causal over the L frames
        story = story.reshape(B * L, 1, -1)
        if not self.prompt:
            return story
        prefix = self.prefix_drop(self.control_trans(self.wte.weight))  # [preseqlen, D]
        return torch.cat([prefix.unsqueeze(0).expand(B * L, -1, -1), story], dim=1)

    def source_embeddings(self, source_codes: Tensor, n_frames: int) -> Tensor:
        """[B, S] codes -> [B*L, S, D] with the shared `tok_emb_img` + `pos_emb_img`, repeated over the L frames."""
        pos = torch.arange(source_codes.shape[1], device=source_codes.device)
        src = self.stage2.tok_emb_img(source_codes) + self.stage2.pos_emb_img(pos)
        return src.repeat_interleave(n_frames, dim=0)

    def _embed_prompt(self, prompt: Tensor) -> Tensor:
        pos = torch.arange(prompt.shape[1], device=prompt.device)
        return prompt + self.stage2.pos_emb_txt(pos)

    def _embed_txt(self, texts: Tensor) -> Tensor:
        pos = torch.arange(texts.shape[1], device=texts.device)
        return self.stage2.tok_emb_txt(texts) + self.stage2.pos_emb_txt(pos)

    def _embed_img(self, images: Tensor, start: int = 0) -> Tensor:
        pos = torch.arange(start, start + images.shape[1], device=images.device)
        return self.stage2.tok_emb_img(images) + self.stage2.pos_emb_img(pos)

    # ------------------------------------------------------------------ blocks
    def _run_blocks(
        self,
        x: Tensor,
        *,
        start: int,
        first_img_pred: int,
        src: Tensor | None,
        past: KVCache | None = None,
        src_rows: Tensor | None = None,
    ) -> tuple[Tensor, KVCache]:
        """Backbone blocks over new positions start..start+T-1 with cross-attention inserted after self-attention.

        Cross-attention reaches only positions >= first_img_pred (= P+N-1, those predicting image tokens), on the
        full pass and on every cached step alike; `src_rows` [M] (bool) limits it to the sequences that have a
        source frame (visualization: a story's first frame is drawn from its text alone). With a `StaticKVCache`
        as `past` the source's keys and values are projected on the first step only (`past.cross`) and the cache
        is filled in place and returned.
        """
        T = x.shape[1]
        xmask = None
        if src is not None and self.cross_blocks:
            pos = torch.arange(start, start + T, device=x.device)
            xmask = (pos >= first_img_pred).to(x.dtype).view(1, T, 1)
            if src_rows is not None:
                xmask = xmask * src_rows.to(device=x.device, dtype=x.dtype).view(-1, 1, 1)
            if not bool(xmask.any()):
                xmask = None
        static = isinstance(past, StaticKVCache)
        presents: KVCache = past if static else []
        for i, blk in enumerate(self.stage2.blocks):
            a, kv = blk.attn(blk.ln1(x), None if past is None else past[i])
            if not static:
                presents.append(kv)
            x = x + a
            j = self._cross_of.get(i)
            if j is not None and xmask is not None:
                layer = self.cross_attn[j]
                src_kv = None
                if static:
                    if j not in past.cross:
                        past.cross[j] = layer.source_kv(src)
                    src_kv = past.cross[j]
                x = x + layer(x, src, kv=src_kv) * xmask
            x = x + blk.mlp(blk.ln2(x))
        return x, presents

    def _sequence(self, prompt: Tensor, texts: Tensor, images: Tensor) -> Tensor:
        return self.stage2.drop(
            torch.cat([self._embed_prompt(prompt), self._embed_txt(texts), self._embed_img(images)], dim=1)
        )

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        texts: Tensor,
        images: Tensor,
        source_codes: Tensor | None,
        sentence_embeds: Tensor,
        source_rows: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """texts [B, L, N], images [B, L, T], source_codes [B, S] (None: no cross-attention), sentence_embeds
        [B, L, E], source_rows [B, L] or [L] bool (None: every frame sees the source). Returns
        (logits_img [B*L, T, V_img], logits_txt [B*L, N-1, V_txt]); image token t is read at position P+N-1+t and
        text token n+1 at P+n."""
        B, L, N = texts.shape
        texts, images = texts.reshape(B * L, N), images.reshape(B * L, -1)
        T = images.shape[1]
        if N > self.cfg.ctx_len_txt or T > self.cfg.ctx_len_img:
            raise ValueError(f"text {N} / image {T} tokens exceed ctx {self.cfg.ctx_len_txt}/{self.cfg.ctx_len_img}")
        prompt = self.story_embeddings(sentence_embeds)
        P = prompt.shape[1]
        src = None if source_codes is None else self.source_embeddings(source_codes, L)
        rows = None if source_rows is None else source_rows.expand(B, L).reshape(B * L)
        h, _ = self._run_blocks(
            self._sequence(prompt, texts, images), start=0, first_img_pred=P + N - 1, src=src, src_rows=rows
        )
        h = self.stage2.ln_f(h)
        logits_img = self.stage2.head_img(h[:, P + N - 1 : P + N - 1 + T])
        logits_txt = self.stage2.head_txt(h[:, P : P + N - 1])
        return logits_img, logits_txt

    def loss(
        self,
        texts: Tensor,
        images: Tensor,
        source_codes: Tensor | None,
        sentence_embeds: Tensor,
        pad_id: int,
        mask_text_padding: bool = True,
        source_rows: Tensor | None = None,
        text_tokens: Tensor | float | None = None,
    ) -> dict[str, Tensor]:
        """Image CE + text CE (weights 1:1). mask_text_padding=False reproduces the original (pads are targets).

        The masked text CE is a sum over kept tokens divided by `text_tokens` (default: this batch's count). Under
        data parallelism the caller passes the global batch's count divided by the number of processes, so the
        processes' mean loss -- and DDP's averaged gradient -- is the global batch's token mean, not a mean of
        per-shard means (shards hold different numbers of caption tokens)."""
        logits_img, logits_txt = self(texts, images, source_codes, sentence_embeds, source_rows)
        loss_img = F.cross_entropy(logits_img.reshape(-1, logits_img.shape[-1]), images.reshape(-1))
        tgt = texts.reshape(-1, texts.shape[-1])[:, 1:].reshape(-1)
        per_tok = F.cross_entropy(logits_txt.reshape(-1, logits_txt.shape[-1]), tgt, reduction="none")
        if mask_text_padding:
            keep = (tgt != pad_id).to(per_tok.dtype)
            count = keep.sum() if text_tokens is None else torch.as_tensor(text_tokens, dtype=per_tok.dtype)
            loss_txt = (per_tok * keep).sum() / count.clamp_min(1.0)
        else:
            loss_txt = per_tok.mean()
        return {"loss": loss_img + loss_txt, "loss_img": loss_img, "loss_txt": loss_txt}

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def step(
        self,
        *,
        prompt: Tensor | None = None,
        texts: Tensor | None = None,
        images: Tensor | None = None,
        src: Tensor | None,
        start: int,
        first_img_pred: int,
        past: KVCache | None = None,
    ) -> tuple[Tensor, KVCache]:
        """Feed new positions beginning at absolute position `start`: step 0 is [prompt ; texts] (start 0), later
        steps one code each (start P+N+t-1, image position t-1). Returns image logits of the last new position."""
        parts = []
        if prompt is not None:
            parts.append(self._embed_prompt(prompt))
        if texts is not None:
            parts.append(self._embed_txt(texts))
        if images is not None:
            parts.append(self._embed_img(images, start=start - first_img_pred - 1))
        x = self.stage2.drop(torch.cat(parts, dim=1))
        h, presents = self._run_blocks(x, start=start, first_img_pred=first_img_pred, src=src, past=past)
        return self.stage2.head_img(self.stage2.ln_f(h[:, -1])), presents

    @torch.no_grad()
    def sample(
        self,
        texts: Tensor,
        sentence_embeds: Tensor,
        source_codes: Tensor | None,
        *,
        top_k: int | None,
        top_p: float | None,
        temperature: float = 1.0,
        generator: Generators = None,
        num_codes: int | None = None,
        use_cache: bool = True,
        chain: bool = False,
        static_cache: bool = True,
        on_frames: OnFrames | None = None,
    ) -> Tensor:
        """Sample a story's frames; texts [B, L, N], sentence_embeds [B, L, E], source_codes [B, S] -> [B, L, T].

        Frame order (`storyexp.models.story_frames`): with `source_codes` all L frames attend to it and are drawn
        in parallel as the original does (one `torch.multinomial` over the [B*L, V] step distribution per code,
        so seeded codes match it; a list of B generators draws each story's rows from its own, `models.draws`); `source_codes=None` (visualization) draws frame 0 from its text alone and uses
        it as the source of the others; `chain=True` makes frame i attend to the generated frame i-1.

        The story block is causal over frames, so a frame's story token is the same whether the frames are drawn
        together or one by one. use_cache=False recomputes the full sequence each step (reference loop); both
        paths draw the same codes under the same seed. static_cache (with use_cache): True = the KV cache is
        preallocated once per frame batch and written in place, and the source frame's cross-attention keys and
        values are projected once (`StaticKVCache`); False = the cache grows by `torch.cat` and the source is
        re-projected at every step, as in the original. The same codes either way.

        ``on_frames``: optional ``on_frames(first, codes [B, n, T])`` after each group of frames is drawn (frames
        first..first+n-1; `storyexp.models.story_frames`); it only observes, the codes are the same without it.
        """
        B, L, N = texts.shape
        prompt = self.story_embeddings(sentence_embeds)
        prompt = prompt.view(B, L, *prompt.shape[1:])
        opts = dict(top_k=top_k, top_p=top_p, temperature=temperature, generator=generator,
                    n_codes=num_codes or self.cfg.ctx_len_img, use_cache=use_cache, static_cache=static_cache)

        def draw(frames: list[int], source: Tensor | None) -> Tensor:
            n = len(frames)
            src = None if source is None else self.source_embeddings(source, n)
            rows = self._sample_sequences(
                prompt[:, frames].reshape(B * n, *prompt.shape[2:]), texts[:, frames].reshape(B * n, N), src, **opts
            )
            return rows.view(B, n, -1)

        return sample_story_frames(draw, L, source_codes, chain, on_frames)

    def _sample_sequences(
        self,
        prompt: Tensor,
        texts: Tensor,
        src: Tensor | None,
        *,
        n_codes: int,
        top_k: int | None,
        top_p: float | None,
        temperature: float,
        generator: Generators,
        use_cache: bool,
        static_cache: bool = True,
    ) -> Tensor:
        """prompt [M, P, D], texts [M, N], src [M, S, D] or None -> codes [M, n_codes]; temperature -> top-k ->
        softmax -> top-p (`next_code_probs`), one multinomial over [M, V] per code."""
        P, N = prompt.shape[1], texts.shape[1]
        first = P + N - 1
        codes = texts.new_zeros(texts.shape[0], n_codes)  # written in place, one column per step
        past = self.stage2.new_cache(extra_positions=P) if use_cache and static_cache else None
        for t in range(n_codes):
            if not use_cache:
                h, _ = self._run_blocks(self._sequence(prompt, texts, codes[:, :t]), start=0, first_img_pred=first,
                                        src=src)  # fmt: skip
                logits = self.stage2.head_img(self.stage2.ln_f(h[:, -1]))
            elif t == 0:  # whole [prompt ; caption]; its last position P+N-1 predicts code 0
                logits, past = self.step(prompt=prompt, texts=texts, src=src, start=0, first_img_pred=first, past=past)
            else:  # previous code at image position t-1, absolute position P+N+t-1
                logits, past = self.step(
                    images=codes[:, t - 1 : t], src=src, start=first + t, first_img_pred=first, past=past
                )
            probs = next_code_probs(logits, top_k=top_k, top_p=top_p, temperature=temperature)
            codes[:, t : t + 1] = multinomial(probs, 1, replacement=True, generator=generator)
        return codes


def sample_story_codes(net: StoryDalleNet, texts: Tensor, sentence_embeds: Tensor, source_codes: Tensor | None,
                       **kwargs: Any) -> Tensor:
    """Functional alias of `StoryDalleNet.sample`."""
    return net.sample(texts, sentence_embeds, source_codes, **kwargs)


# ---------------------------------------------------------------------- released checkpoint
def load_storydalle_checkpoint(
    net: StoryDalleNet,
    state_dict: Mapping[str, Any],
    *,
    stage1: nn.Module | None = None,
    allow_missing_cross_attn: bool = True,
    what: str = "StoryDALL-E checkpoint",
) -> dict[str, Tensor]:
    """Strictly load the released layout (`{'model_state_dict': ...}`, `{'state_dict': ...}` or the bare mapping).

    - The text vocabulary is resized to `stage2.tok_emb_txt.weight`'s row count first (16393 for Pororo).
    - `stage1.*` keys (VQGAN) are loaded strictly into `stage1` when given; they are returned with the prefix
      stripped either way.
    - The released files hold no cross-attention keys (the original never registered them): when the checkpoint has
      no `cross_attn.*` key at all and `allow_missing_cross_attn`, those layers keep their init (zero gate: inert).
    - Any other missing or unexpected key, or a shape mismatch, raises one `CheckpointMismatchError` (`what` names
      the file) counting them and naming the first ones.
    """
    for wrapper in ("model_state_dict", "state_dict"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
            state_dict = state_dict[wrapper]
            break
    stage1_state = {k[len("stage1.") :]: v for k, v in state_dict.items() if k.startswith("stage1.")}
    state = {k: v for k, v in state_dict.items() if not k.startswith("stage1.")}

    emb_key = "stage2.tok_emb_txt.weight"
    if emb_key in state and hasattr(state[emb_key], "shape") and state[emb_key].shape[0] != net.cfg.vocab_size_txt:
        net._set_text_vocab(int(state[emb_key].shape[0]))

    excuse_cross_attn = allow_missing_cross_attn and not any(k.startswith("cross_attn.") for k in state)
    check_state_dict(net.state_dict(), state, what,
                     ignore_missing=lambda key: excuse_cross_attn and key.startswith("cross_attn."),
                     hint="use a checkpoint trained with the configured story options (prompt, condition, "
                          "story_len, sizes) or change those options to the checkpoint's")
    net.load_state_dict(state, strict=False)  # keys and shapes checked above; only the excused keys are absent
    if stage1 is not None:
        check_state_dict(stage1.state_dict(), stage1_state, f"{what} (its stage1.* VQGAN keys)",
                         hint="use the stage-1 VQGAN sizes the checkpoint was trained with")
        stage1.load_state_dict(stage1_state, strict=True)
    return stage1_state
