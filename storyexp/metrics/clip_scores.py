"""CLIP scores of generated stories, as StoryGen / ViStoryBench report them (``eval.metrics: [clip]``).

* ``clip_score`` -- torchmetrics' :class:`~torchmetrics.multimodal.clip_score.CLIPScore` between every generated frame
  and its caption: ``100 * cos(E_image, E_caption)`` averaged over all frames, then ``max(., 0)`` (torchmetrics
  clamps the mean, not each frame; with a trained CLIP the image-caption cosines are positive, so this is the mean
  of ``100 * max(cos, 0)``).
* ``clip_consistency`` -- story consistency: per story, the mean cosine similarity (not scaled by 100) of the CLIP
  image embeddings over all unordered pairs of its generated frames; the mean over stories. Stories with a single
  frame contribute nothing; when no story has two frames, ``compute()`` leaves the key out (with a warning).

One CLIP model serves both: the image embeddings of the consistency are the ones CLIPScore computes (captured by the
adapter below, so every frame goes through the image tower once). The model is a local folder in transformers'
``save_pretrained`` layout (``CLIPModel`` + ``CLIPProcessor``, e.g. ``openai/clip-vit-base-patch32``); it is never
downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.multimodal.clip_score import CLIPScore
from torchmetrics.utilities import rank_zero_warn

from storyexp.errors import ConfigurationError, MissingResourceError, StoryexpError
from storyexp.metrics._io import as_uint8_nhwc
from storyexp.metrics.registry import MetricContext, MetricUnavailable

__all__ = ["CLIP_HOW_TO_GET", "StoryCLIPScores", "build_clip_metric", "find_clip_folder", "load_clip"]

CLIP_HOW_TO_GET = ("CLIP models are never downloaded by storyexp; get one with `hf download "
                   "openai/clip-vit-base-patch32 --local-dir weights/clip/clip-vit-base-patch32` and set "
                   "eval.clip.model=weights/clip/clip-vit-base-patch32")


# ------------------------------------------------------------------------------------------------ loading


def find_clip_folder(model: str | os.PathLike | None) -> Path:
    """The local CLIP folder ``eval.clip.model`` names (a relative path: from the working directory, then from
    ``$STORYEXP_ROOT``); one-line :class:`MissingResourceError` when there is none."""
    if model in (None, ""):
        raise MissingResourceError(f"No CLIP model configured (eval.clip.model is null). {CLIP_HOW_TO_GET}.")
    path = Path(model).expanduser()
    places = [path]
    if not path.is_absolute() and os.environ.get("STORYEXP_ROOT"):
        places.append(Path(os.environ["STORYEXP_ROOT"]) / path)
    for place in places:
        if place.is_dir():
            return place
    looked = " or ".join(f"'{p}'" for p in dict.fromkeys(places))
    raise MissingResourceError(f"CLIP model folder eval.clip.model={model} not found at {looked}. {CLIP_HOW_TO_GET}.")


def load_clip(folder: str | os.PathLike) -> tuple[Any, Any]:
    """``(CLIPModel, CLIPProcessor)`` from a local ``save_pretrained`` folder: float32, eval mode, frozen.

    No pickle is read and no code runs: ``use_safetensors=True`` makes transformers read only ``model.safetensors``
    (never ``pytorch_model.bin``), the processor is JSON / text files, ``local_files_only=True`` keeps the hub out
    and the concrete classes (no ``Auto*``, no ``trust_remote_code``) never import code from the folder.
    """
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(folder)
    if not any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise MissingResourceError(f"CLIP model folder '{folder}' has no model.safetensors (storyexp does not read "
                                   f"pickled pytorch_model.bin weights). {CLIP_HOW_TO_GET}.")
    try:
        model = CLIPModel.from_pretrained(folder, use_safetensors=True, local_files_only=True, dtype=torch.float32)
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StoryexpError(f"CLIP model folder '{folder}' is not a transformers CLIPModel + CLIPProcessor "
                            f"save_pretrained folder: {first}") from None
    return model.eval().requires_grad_(False), processor


class _CLIPFeatures(torch.nn.Module):
    """The CLIP model as torchmetrics' CLIPScore calls it (``get_image_features`` / ``get_text_features`` returning
    the projected embeddings as tensors).

    Why: transformers >= 5 returns a ``BaseModelOutputWithPooling`` (the projection in ``pooler_output``) from
    these methods, which torchmetrics 1.9's CLIPScore cannot take (Lightning-AI/torchmetrics#3407). It also keeps
    the last image embeddings, so the consistency reuses CLIPScore's forward pass instead of a second one.
    """

    def __init__(self, clip: Any) -> None:
        super().__init__()
        self.clip = clip
        self.config = clip.config  # CLIPScore reads config.text_config.max_position_embeddings
        self.last_image_features: Tensor | None = None

    @staticmethod
    def _tensor(out: Any) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: Tensor, **kwargs: Any) -> Tensor:
        feats = self._tensor(self.clip.get_image_features(pixel_values=pixel_values, **kwargs))
        self.last_image_features = feats.detach()
        return feats

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        return self._tensor(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kwargs))


class _TruncatingProcessor:
    """The CLIP processor with ``truncation=True`` for text: the tokenizer truncates long captions and keeps their
    end-of-text token (CLIP pools there). torchmetrics would instead warn and cut ``input_ids`` after tokenizing,
    which drops that token."""

    def __init__(self, processor: Any, max_length: int) -> None:
        self.processor, self.max_length = processor, int(max_length)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("text") is not None:
            kwargs.setdefault("truncation", True)
            kwargs.setdefault("max_length", self.max_length)
        return self.processor(*args, **kwargs)


# ------------------------------------------------------------------------------------------------ metric


class StoryCLIPScores(Metric):
    """``clip_score`` and ``clip_consistency`` of generated frames, a :class:`~storyexp.metrics.base.StoryMetric`.

    ``update(generated, real=None, labels=None, *, captions, stories)``: uint8 ``[N, H, W, 3]`` frames, their
    ``N`` captions and ``N`` story ids (a story's frames all in one call; ``stories`` may be ``None`` when
    ``consistency=False``). ``real`` and ``labels`` are ignored. Frames go through CLIP in chunks of
    ``batch_size``.

    States are float64 sums with ``dist_reduce_fx="sum"`` (CLIP scores and frame count; per-story mean cosines and
    story count), so ``compute()`` under DDP equals one process over the same stories. The CLIP network lives in a
    hidden CLIPScore kept in a list, outside the module tree: never in ``state_dict()`` or a checkpoint; it follows
    the metric's device at the next ``update``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, model: Any, processor: Any, *, batch_size: int = 32, consistency: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if int(batch_size) < 1:
            raise ConfigurationError(f"eval.clip.batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.consistency = bool(consistency)
        features = _CLIPFeatures(model.eval().requires_grad_(False))
        max_length = model.config.text_config.max_position_embeddings
        # the callable form is torchmetrics' supported way to pass a model (a string must be one of its hub names)
        scorer = CLIPScore(model_name_or_path=lambda: (features, _TruncatingProcessor(processor, max_length)),
                           sync_on_compute=False)
        self._scorer = [scorer]  # a list: kept out of the module tree (and out of state_dict)
        self.add_state("score_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("score_n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("consistency_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("consistency_n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self._seen_stories: set[str] = set()  # this process's, to refuse a story split over two updates

    @property
    def scorer(self) -> CLIPScore:
        scorer = self._scorer[0]
        if scorer.device != self.device:
            self._scorer[0] = scorer = scorer.to(self.device)
        return scorer

    @property
    def clip_model(self) -> Any:
        """The transformers ``CLIPModel``."""
        return self._scorer[0].model.clip

    def _check_inputs(self, n: int, captions: Sequence[str] | None,
                      stories: Sequence[Any] | None) -> tuple[list[str], list[str] | None]:
        if captions is None:
            raise ValueError("clip_score needs the caption of every generated frame: update(..., captions=[...])")
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError("clip_score: captions must be a sequence of strings, one per generated frame")
        captions = list(captions)
        if len(captions) != n:
            raise ValueError(f"clip_score: {n} generated frames but {len(captions)} captions")
        if not self.consistency:
            return captions, None
        if stories is None:
            raise ValueError("clip_consistency needs the story id of every generated frame: update(..., stories=[...])"
                             " (or StoryCLIPScores(consistency=False))")
        if isinstance(stories, str):
            raise ValueError("clip_consistency: stories must be a sequence of story ids, one per generated frame")
        stories = [str(s) for s in stories]
        if len(stories) != n:
            raise ValueError(f"clip_consistency: {n} generated frames but {len(stories)} story ids")
        again = sorted(set(stories) & self._seen_stories)
        if again:
            raise ValueError(f"clip_consistency: frames of story {again[0]!r} came in two update() calls; a story's "
                             "frames must all come in one call (reset() between evaluations)")
        return captions, stories

    @torch.no_grad()
    def update(self, generated: Any, real: Any | None = None, labels: Any | None = None, *,  # type: ignore[override]
               captions: Sequence[str] | None = None, stories: Sequence[str] | None = None) -> None:
        frames = as_uint8_nhwc(generated, "generated")
        captions, stories = self._check_inputs(frames.shape[0], captions, stories)
        if frames.shape[0] == 0:
            return
        scorer = self.scorer
        images = frames.to(self.device).permute(0, 3, 1, 2)  # CLIPScore takes [C, H, W] images
        embeddings = []
        for start in range(0, len(captions), self.batch_size):
            chunk = list(images[start:start + self.batch_size])
            scorer.reset()
            scorer.update(chunk, captions[start:start + self.batch_size])
            self.score_sum += scorer.score.to(torch.float64)
            self.score_n += len(chunk)
            feats = scorer.model.last_image_features
            if feats is None or feats.shape[0] != len(chunk):
                raise RuntimeError("StoryCLIPScores: CLIPScore did not compute the image embeddings of the chunk")
            embeddings.append(feats.to(torch.float64))
        if stories is None:
            return
        self._seen_stories.update(stories)
        emb = torch.cat(embeddings)
        emb = emb / emb.norm(p=2, dim=-1, keepdim=True)
        groups: dict[str, list[int]] = {}
        for i, story in enumerate(stories):
            groups.setdefault(story, []).append(i)
        for index in groups.values():
            k = len(index)
            if k < 2:
                continue
            gram = emb[index] @ emb[index].T
            # mean over the unordered pairs i < j: the off-diagonal sum of the symmetric Gram matrix / k (k - 1)
            self.consistency_sum += (gram.sum() - gram.diagonal().sum()) / (k * (k - 1))
            self.consistency_n += 1

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        if float(self.score_n) == 0:
            raise RuntimeError("clip_score: no generated frames were scored")
        # CLIPScore.compute's formula on the float64 sums
        out = {"clip_score": max(float(self.score_sum / self.score_n), 0.0)}
        if self.consistency:
            if float(self.consistency_n) > 0:
                out["clip_consistency"] = float(self.consistency_sum / self.consistency_n)
            else:
                rank_zero_warn("clip_consistency is left out: no story had two or more generated frames", UserWarning)
        return out

    def reset(self) -> None:
        super().reset()
        self._seen_stories = set()


# ------------------------------------------------------------------------------------------------ builder


def build_clip_metric(context: MetricContext) -> StoryCLIPScores:
    """``eval.clip`` (``model``: local folder or null, ``required``, ``batch_size``) -> :class:`StoryCLIPScores`;
    :class:`MetricUnavailable` (one line) when the model is absent and not required."""
    cfg = context.section("clip")
    try:
        model, processor = load_clip(find_clip_folder(cfg.get("model")))
    except MissingResourceError as err:
        if cfg.get("required"):
            raise
        raise MetricUnavailable(f"{err} (CLIP scores are skipped; eval.clip.required=true makes this an error)"
                                ) from None
    return StoryCLIPScores(model, processor, batch_size=int(cfg.get("batch_size") or 32))
