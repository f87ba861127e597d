"""`MinDalle`: a minDALL-E folder as distributed (config.yaml, stage1_last.ckpt, stage2_last.ckpt,
tokenizer/bpe-16k-{vocab.json,merges.txt}) as one module with the public API the story model and notebooks use:

    m = MinDalle.from_pretrained(folder)            # sizes come from the folder's config.yaml
    ids = m.tokenize(list_of_captions)              # LongTensor [B, ctx_len_txt], the original tokenizer's ids
    codes = m.encode_images(images)                 # images [B,3,R,R] in [-1,1] -> LongTensor [B, T] (raster order)
    pixels = m.decode_codes(codes)                  # [B, T] -> [B,3,R,R] in [0,1] (= clamp(0.5*decoder(x)+0.5, 0, 1))
    logits_img, logits_txt = m.logits(ids, codes)   # teacher-forced stage-2 forward; codes may be shorter than T
    codes = m.sample(ids, top_k=..., top_p=...)     # KV-cached sampling, the original's step order

config.yaml is merged over minDALL-E's defaults (the 1.3B model), as `Dalle.from_pretrained` does. The folder is
read by `load_mindalle_folder`, which StoryDALL-E's pretrained build (`storyexp.models.mindalle.build`) shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from storyexp.errors import ConfigurationError, MissingResourceError
from storyexp.models.vqgan import VQGAN, VQGANConfig

from .sampling import sample_codes
from .tokenizer import build_tokenizer
from .transformer import Stage2Config, Transformer1d, positions_1d

TOKENIZER_FILES = ("tokenizer/bpe-16k-vocab.json", "tokenizer/bpe-16k-merges.txt")
CHECKPOINTS = ("stage1_last.ckpt", "stage2_last.ckpt")
WHERE = "a minDALL-E folder as distributed by kakaobrain (e.g. the 1.3B release unpacked)"
HOW_TO_GET = (
    f"Expected {WHERE}: download minDALL-E 1.3B (https://arena.kakaocdn.net/brainrepo/models/minDALL-E/"
    "57b008f02ceaa02b779c8b7463143315/1.3B.tar.gz) and unpack it; a StoryDALL-E config points "
    "model.network.mindalle at the folder (README.md, 'Weights')."
)


def read_config(folder: Path) -> dict[str, Any]:
    """config.yaml merged over the defaults; `dataset.context_length` must equal the text context."""
    from omegaconf import OmegaConf

    user = OmegaConf.to_container(OmegaConf.load(str(folder / "config.yaml")), resolve=True)
    stage1 = VQGANConfig.from_dict(user.get("stage1", {}))
    stage2 = Stage2Config.from_dict(user.get("stage2", {}))
    context = int((user.get("dataset") or {}).get("context_length", 64))
    if context != stage2.ctx_len_txt:
        raise ConfigurationError(
            f"{folder / 'config.yaml'}: dataset.context_length={context} must equal stage2 ctx_len_txt="
            f"{stage2.ctx_len_txt} (the tokenizer pads to it and the transformer expects exactly that length)"
        )
    return {"stage1": stage1, "stage2": stage2, "context_length": context}


@dataclass
class MinDalleFolder:
    """What a minDALL-E folder holds: stage 1 loaded, the stage-2 sizes and checkpoint, the tokenizer."""

    folder: Path
    stage1: VQGAN
    stage2_config: Stage2Config
    stage2_checkpoint: Path
    tokenizer: Any
    context_length: int


def load_mindalle_folder(folder: str | Path) -> MinDalleFolder:
    """Read a minDALL-E folder: config.yaml (over the defaults), stage 1 strictly loaded (eval mode), the tokenizer.

    Stage 2 is returned as sizes + checkpoint path for the caller to build and load (`MinDalle` loads a bare
    `Transformer1d`, StoryDALL-E the one inside its `StoryDalleNet`). Every missing file is listed in one
    MissingResourceError.
    """
    folder = Path(folder)
    missing = [name for name in ("config.yaml", *CHECKPOINTS, *TOKENIZER_FILES) if not (folder / name).is_file()]
    if missing:
        raise MissingResourceError(f"minDALL-E files {', '.join(missing)}", folder, HOW_TO_GET)
    cfg = read_config(folder)
    stage1 = VQGAN.from_ckpt(folder / CHECKPOINTS[0], cfg["stage1"])
    tokenizer = build_tokenizer(folder / "tokenizer", cfg["context_length"], lowercase=True, dropout=None)
    return MinDalleFolder(folder=folder, stage1=stage1, stage2_config=cfg["stage2"],
                          stage2_checkpoint=folder / CHECKPOINTS[1], tokenizer=tokenizer,
                          context_length=cfg["context_length"])


class MinDalle(nn.Module):
    def __init__(self, stage1: VQGAN, stage2: Transformer1d, tokenizer):
        super().__init__()
        self.stage1, self.stage2, self.tokenizer = stage1, stage2, tokenizer

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "MinDalle":
        parts = load_mindalle_folder(folder)
        stage2 = Transformer1d.from_ckpt(parts.stage2_config, parts.stage2_checkpoint)
        return cls(parts.stage1, stage2, parts.tokenizer).eval()

    @property
    def grid_side(self) -> int:
        return self.stage1.config.latent_dim

    def tokenize(self, captions: list[str]) -> Tensor:
        ids = [enc.ids for enc in self.tokenizer.encode_batch(list(captions))]
        return torch.tensor(ids, dtype=torch.long, device=self.stage2.tok_emb_txt.weight.device)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        return self.stage1.get_codes(images)

    @torch.no_grad()
    def decode_codes(self, codes: Tensor) -> Tensor:
        side = self.grid_side
        raw = self.stage1.decode_code(codes.view(codes.shape[0], side, side))
        return torch.clamp(raw * 0.5 + 0.5, 0, 1)

    def logits(self, ids: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
        return self.stage2(codes, ids, positions_1d(codes), positions_1d(ids))

    @torch.no_grad()
    def sample(self, ids: Tensor, *, top_k: int | None = 256, top_p: float | None = None, temperature: float = 1.0,
               num_candidates: int = 1, generator: torch.Generator | None = None) -> Tensor:
        return sample_codes(self.stage2, ids, top_k=top_k, top_p=top_p, temperature=temperature,
                            num_candidates=num_candidates, generator=generator)
