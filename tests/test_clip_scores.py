"""CLIP scores (storyexp.metrics.clip_scores) on a tiny real CLIPModel + CLIPProcessor saved in the hub layout."""

from __future__ import annotations

import json
from pathlib import Path
import warnings

import numpy as np
import pytest
import torch

from storyexp.errors import MissingResourceError
from storyexp.metrics.base import StoryMetric
from storyexp.metrics.clip_scores import StoryCLIPScores, build_clip_metric, load_clip
from storyexp.metrics.registry import MetricContext, MetricUnavailable, build_metric

MAX_TEXT = 16  # the tiny text tower's positions: long captions must be truncated to this


def _write_tokenizer_files(folder) -> None:
    """CLIP's BPE files: the 256 byte-level symbols, each also with ``</w>``, a few merges, the two specials."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("t", "h"), ("th", "e</w>"),
              ("r", "e"), ("re", "d</w>")]
    vocab = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + ["<|startoftext|>",
                                                                                    "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    root = tmp_path_factory.mktemp("clip")
    _write_tokenizer_files(root / "bpe")
    tokenizer = CLIPTokenizer.from_pretrained(root / "bpe")
    ids = tokenizer("the red cat")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["<|startoftext|>", "the</w>", "red</w>", "cat</w>",
                                                    "<|endoftext|>"]
    torch.manual_seed(5)  # a seed whose image-caption cosines are mostly, not all, positive (mean ~0.11)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=MAX_TEXT,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    out = root / "tiny-clip"
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    return out


@pytest.fixture(scope="module")
def loaded(clip_dir):
    return load_clip(clip_dir)


def _metric(loaded, **kwargs) -> StoryCLIPScores:
    return StoryCLIPScores(*loaded, **kwargs)


def _frames(n: int, seed: int, size: tuple[int, int] = (40, 48)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, *size, 3))
    noise = rng.integers(-60, 61, (n, *size, 3))  # frames of a story share a base image: cosines differ by story
    return np.clip(base + noise, 0, 255).astype(np.uint8)


CAPTIONS = ["the red cat", "a dog", "the cat and the dog " * 10, "red", "", "the dog sees the red cat!", "cat",
            "dog dog"]


def _stories():
    """Three stories of 3, 4 and 1 frames (frames, captions, story ids)."""
    frames = np.concatenate([_frames(3, 1), _frames(4, 2), _frames(1, 3)])
    ids = ["s0"] * 3 + ["s1"] * 4 + ["s2"]
    return frames, list(CAPTIONS), ids


@torch.no_grad()
def _embeddings(loaded, frames: np.ndarray, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Unit image and text embeddings by hand: the same processor and model, float64 numpy."""
    model, processor = loaded
    images = [torch.from_numpy(f).permute(2, 0, 1) for f in frames]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    text = processor(text=captions, return_tensors="pt", padding=True, truncation=True, max_length=MAX_TEXT)
    img = model.get_image_features(pixel_values=pixels).pooler_output.double().numpy()
    txt = model.get_text_features(input_ids=text["input_ids"],
                                  attention_mask=text["attention_mask"]).pooler_output.double().numpy()
    return (img / np.linalg.norm(img, axis=1, keepdims=True), txt / np.linalg.norm(txt, axis=1, keepdims=True))


def _hand_consistency(img: np.ndarray, ids: list[str]) -> float:
    means = []
    for story in dict.fromkeys(ids):
        e = img[[i for i, s in enumerate(ids) if s == story]]
        pairs = [float(e[i] @ e[j]) for i in range(len(e)) for j in range(i + 1, len(e))]
        if pairs:
            means.append(np.mean(pairs))
    return float(np.mean(means))


def test_clip_score_and_consistency_match_hand_computation(loaded):
    frames, captions, ids = _stories()
    metric = _metric(loaded, batch_size=3)
    assert isinstance(metric, StoryMetric)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the long caption is truncated by the tokenizer, not cut by torchmetrics
        metric.update(frames, None, None, captions=captions, stories=ids)
    got = metric.compute()
    img, txt = _embeddings(loaded, frames, captions)
    cos = (img * txt).sum(1)
    assert 100 * cos.mean() > 5 and (cos < 0).any()  # the fixture's seed: the clamp below is not trivially 0
    # torchmetrics' CLIPScore: mean of 100 cos over the frames, clamped at 0 (the mean, not each frame: with a
    # negative frame this differs from mean(100 max(cos, 0)); a torchmetrics that clamps per frame fails here)
    assert got["clip_score"] == pytest.approx(max(100 * cos.mean(), 0.0), rel=1e-5, abs=1e-4)
    assert got["clip_score"] < 100 * np.maximum(cos, 0).mean() - 1
    assert got["clip_consistency"] == pytest.approx(_hand_consistency(img, ids), rel=1e-5, abs=1e-6)
    assert set(got) == {"clip_score", "clip_consistency"}
    # the single-frame story s2 contributes nothing: the same as the two multi-frame stories alone
    assert _hand_consistency(img, ids) == pytest.approx(_hand_consistency(img[:7], ids[:7]))


def test_clip_score_equals_torchmetrics_on_all_frames_at_once(loaded):
    from torchmetrics.multimodal.clip_score import CLIPScore

    frames, captions, ids = _stories()
    metric = _metric(loaded, batch_size=2)
    metric.update(frames, captions=captions, stories=ids)
    # the same model and processor adapters (torchmetrics 1.9 cannot take transformers 5's outputs directly)
    reference = CLIPScore(model_name_or_path=lambda: (metric._scorer[0].model, metric._scorer[0].processor))
    reference.update(list(torch.from_numpy(frames).permute(0, 3, 1, 2)), captions)
    assert metric.compute()["clip_score"] == pytest.approx(float(reference.compute()), rel=1e-5, abs=1e-4)


def test_independent_of_update_order_and_batch_size(loaded):
    frames, captions, ids = _stories()
    whole = _metric(loaded, batch_size=8)
    whole.update(frames, captions=captions, stories=ids)
    expected = whole.compute()
    for batch_size in (1, 3, 5):
        a, b = _metric(loaded, batch_size=batch_size), _metric(loaded, batch_size=batch_size)
        a.update(frames[:3], captions=captions[:3], stories=ids[:3])  # s0, then s1 + s2
        a.update(frames[3:], captions=captions[3:], stories=ids[3:])
        b.update(frames[3:], captions=captions[3:], stories=ids[3:])  # the other order
        b.update(frames[:3], captions=captions[:3], stories=ids[:3])
        for got in (a.compute(), b.compute()):
            assert got.keys() == expected.keys()
            for key in expected:
                assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), (key, batch_size)
    # frames of a story need not be contiguous within the call
    perm = np.random.default_rng(0).permutation(len(ids))
    shuffled = _metric(loaded, batch_size=4)
    shuffled.update(frames[perm], captions=[captions[i] for i in perm], stories=[ids[i] for i in perm])
    assert shuffled.compute()["clip_consistency"] == pytest.approx(expected["clip_consistency"], rel=1e-5)


def test_reset_states_and_story_rules(loaded):
    frames, captions, ids = _stories()
    metric = _metric(loaded)
    metric.update(frames, captions=captions, stories=ids)
    first = metric.compute()
    with pytest.raises(ValueError, match="'s0' came in two update"):
        metric.update(frames[:2], captions=captions[:2], stories=ids[:2])
    metric.reset()
    assert float(metric.score_n) == 0 and float(metric.consistency_n) == 0
    metric.update(frames, captions=captions, stories=ids)
    assert metric.compute() == pytest.approx(first)
    # float64 states summed across processes (DDP): the sums and counts, nothing per frame
    for name in ("score_sum", "score_n", "consistency_sum", "consistency_n"):
        assert metric._reductions[name] is not None and getattr(metric, name).dtype == torch.float64
    assert float(metric.consistency_n) == 2  # s2 has a single frame

    single = _metric(loaded)
    single.update(frames[7:], captions=captions[7:], stories=ids[7:])
    with pytest.warns(UserWarning, match="no story had two"):
        out = single.compute()
    assert set(out) == {"clip_score"}

    only_score = _metric(loaded, consistency=False)
    only_score.update(frames, captions=captions)
    assert only_score.compute()["clip_score"] == pytest.approx(first["clip_score"])


def test_input_errors(loaded):
    frames, captions, ids = _stories()
    metric = _metric(loaded)
    with pytest.raises(ValueError, match="needs the caption of every generated frame"):
        metric.update(frames, stories=ids)
    with pytest.raises(ValueError, match="8 generated frames but 7 captions"):
        metric.update(frames, captions=captions[:7], stories=ids)
    with pytest.raises(ValueError, match="needs the story id"):
        metric.update(frames, captions=captions)
    with pytest.raises(TypeError, match="uint8"):
        metric.update(frames.astype(np.float32), captions=captions, stories=ids)
    with pytest.raises(RuntimeError, match="no generated frames"):
        metric.compute()


def test_state_dict_holds_no_clip_weights(loaded):
    metric = _metric(loaded)
    frames, captions, ids = _stories()
    metric.update(frames, captions=captions, stories=ids)
    assert not [k for k in metric.state_dict() if "clip" in k.lower() or "model" in k]
    assert len(metric.state_dict()) == 0  # states are not persistent; the network is outside the module tree
    assert not list(metric.parameters()) and not list(metric.children())
    holder = torch.nn.Module()
    holder.metric = metric  # as a metric attribute of a LightningModule: its checkpoint gets no CLIP weights
    assert not [k for k in holder.state_dict() if "clip" in k.lower()]
    assert sum(p.numel() for p in metric.clip_model.parameters()) > 0


def test_builder_through_the_registry(clip_dir):
    frames, captions, ids = _stories()
    context = MetricContext(eval_cfg={"clip": {"model": str(clip_dir), "required": True, "batch_size": 3}})
    metric = build_clip_metric(context)
    assert isinstance(metric, StoryCLIPScores) and metric.batch_size == 3
    metric.update(frames, captions=captions, stories=ids)
    by_name = build_metric("clip", context)
    by_name.update(frames, captions=captions, stories=ids)
    assert by_name.compute() == pytest.approx(metric.compute())


@pytest.mark.parametrize("model", [None, "no/such/clip-folder"])
def test_missing_model_is_unavailable_with_one_line(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STORYEXP_ROOT", str(tmp_path))
    context = MetricContext(eval_cfg={"clip": {"model": model, "required": False, "batch_size": 4}})
    with pytest.raises(MetricUnavailable) as info:
        build_clip_metric(context)
    message = str(info.value)
    assert "\n" not in message
    assert ("eval.clip.model is null" if model is None else "no/such/clip-folder") in message
    assert "never downloaded" in message
    assert "hf download openai/clip-vit-base-patch32 --local-dir weights/clip/clip-vit-base-patch32" in message
    assert "eval.clip.model=weights/clip/clip-vit-base-patch32" in message
    required = MetricContext(eval_cfg={"clip": {"model": model, "required": True}})
    with pytest.raises(MissingResourceError) as info:
        build_clip_metric(required)
    assert "\n" not in str(info.value) and not isinstance(info.value, MetricUnavailable)


def test_pickled_weights_are_not_read(clip_dir, tmp_path):
    import shutil

    folder = tmp_path / "bin-only"
    shutil.copytree(clip_dir, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    context = MetricContext(eval_cfg={"clip": {"model": str(folder), "required": False}})
    with pytest.raises(MetricUnavailable, match="has no model.safetensors"):
        build_clip_metric(context)


def test_relative_model_path_from_storyexp_root(clip_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STORYEXP_ROOT", str(clip_dir.parent))
    metric = build_clip_metric(MetricContext(eval_cfg={"clip": {"model": clip_dir.name}}))
    assert isinstance(metric, StoryCLIPScores) and metric.batch_size == 32


def _ddp_worker(rank: int, world: int, folder: str, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        frames, captions, ids = _stories()
        part = slice(0, 3) if rank == 0 else slice(3, None)  # rank 0: story s0; rank 1: s1 and s2
        metric = StoryCLIPScores(*load_clip(folder), batch_size=2)
        metric.update(frames[part], captions=captions[part], stories=ids[part])
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(metric.compute()))
    finally:
        dist.destroy_process_group()


def test_ddp_compute_equals_one_process(loaded, clip_dir, tmp_path):
    """Two gloo processes holding different stories compute what one process computes over all of them."""
    from .conftest import run_forked

    frames, captions, ids = _stories()
    single = _metric(loaded, batch_size=8)
    single.update(frames, captions=captions, stories=ids)
    expected = single.compute()
    # forked, not spawned: the workers start with this process's imports (a spawned interpreter re-imports torch and
    # transformers, ~7 s on 2 cores)
    run_forked(_ddp_worker, (2, str(clip_dir), str(tmp_path / "init"), str(tmp_path)))
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), (rank, key)


def test_clip_metrics_in_a_test_run(clip_dir, loaded, shared_data_dir, tmp_path):
    """eval.metrics=[clip] through the test callback equals the metric on the frames the run saved, each with its
    own caption and grouped by its story (one test batch: 4 stories x 4 continuation frames)."""
    from PIL import Image

    from storyexp.tasks.common import build_datamodule

    from .conftest import TINY_DEMO, TINY_RUN, compose_cfg, run_composed

    overrides = TINY_DEMO + TINY_RUN + ["eval.metrics=[clip]", f"eval.clip.model={clip_dir}", "eval.baseline=null",
                                        "eval.val_metrics.metrics=[]"]
    metrics, out = run_composed(overrides, tmp_path, shared_data_dir)
    dm = build_datamodule(compose_cfg(overrides, tmp_path / "dm", data_dir=shared_data_dir))
    dm.prepare_data()
    dm.setup("test")
    frames, captions, ids = [], [], []
    for story in (out / "generated").iterdir():
        record = next(s for s in dm.stories(dm.test_split) if s.id == story.name)
        for j in range(1, 5):
            frames.append(np.asarray(Image.open(story / f"{j}.png").convert("RGB")))
            captions.append(record.captions[j])
            ids.append(story.name)
    assert len(set(ids)) == 4
    metric = _metric(loaded)
    metric.update(np.stack(frames), captions=captions, stories=ids)
    expected = metric.compute()
    assert metrics["test/clip_score"] == pytest.approx(expected["clip_score"], rel=1e-5)
    assert metrics["test/clip_consistency"] == pytest.approx(expected["clip_consistency"], rel=1e-5)
