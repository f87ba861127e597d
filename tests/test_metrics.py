"""Tests for storyexp.metrics: character scores, the character classifier (trained through Lightning by
CharacterClassifierSystem), fid_demo and the classifier metrics of the registry (characters, fid_demo).

The frames are drawn here (coloured shapes on a pastel background, like the demo dataset), so these tests do not
depend on the demo dataset generator.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from storyexp.metrics import (
    CharacterClassifier,
    CharacterMetric,
    CharacterClassifierSystem,
    CharacterScores,
    ClassifierFeatureExtractor,
    ClassifierFIDMetric,
    DemoFID,
    StoryMetric,
    StoryMetricSuite,
    load_classifier,
    load_classifier_with_record,
    save_classifier,
    train_character_classifier,
)

# ---------------------------------------------------------------------------------------------- synthetic frames

COLOURS = [(220, 40, 40), (40, 80, 220), (30, 160, 60), (240, 150, 20)]
SHAPES = ["circle", "square", "triangle", "cross"]


def _draw(img: np.ndarray, k: int, cy: float, cx: float, r: float, colour=None) -> None:
    h, w, _ = img.shape
    yy, xx = np.mgrid[0:h, 0:w]
    dy, dx = yy - cy, xx - cx
    shape = SHAPES[k]
    if shape == "circle":
        mask = dy**2 + dx**2 <= r**2
    elif shape == "square":
        mask = (abs(dy) <= 0.8 * r) & (abs(dx) <= 0.8 * r)
    elif shape == "triangle":
        mask = (dy <= 0.8 * r) & (dy >= -r) & (abs(dx) <= (dy + r) * 0.55)
    else:
        mask = ((abs(dy) <= 0.3 * r) & (abs(dx) <= r)) | ((abs(dx) <= 0.3 * r) & (abs(dy) <= r))
    img[mask] = COLOURS[k] if colour is None else colour


def make_frames(n: int, seed: int, size: int = 32, max_chars: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 frames [n, size, size, 3] with up to ``max_chars`` of 4 characters, and [n, 4] labels."""
    rng = np.random.default_rng(seed)
    frames = np.empty((n, size, size, 3), np.uint8)
    labels = np.zeros((n, len(SHAPES)), np.float32)
    for i in range(n):
        frames[i] = rng.integers(190, 256, size=3)
        for k in rng.choice(len(SHAPES), size=rng.integers(0, max_chars + 1), replace=False):
            r = rng.uniform(0.14, 0.22) * size
            _draw(frames[i], int(k), rng.uniform(r, size - r), rng.uniform(r, size - r), r)
            labels[i, k] = 1
    return frames, labels


TINY = dict(input_size=16, channels=(16, 32))


@pytest.fixture(scope="module")
def data():
    return make_frames(900, seed=0), make_frames(300, seed=1)


@pytest.fixture(scope="module")
def trained(data):
    (x, y), (xv, yv) = data
    clf, report = train_character_classifier(
        x, y, val_frames=xv, val_labels=yv, epochs=6, batch_size=32, lr=1e-2, seed=0, **TINY
    )
    return clf, report


# ---------------------------------------------------------------------------------------------- CharacterScores


def _scores(metric: CharacterScores) -> dict[str, float]:
    return {k: float(v) for k, v in metric.compute().items()}


TARGET = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 0], [0, 0, 0]], dtype=torch.float32)
PRED = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.float32)
# TP = 2 (f0 c0, f1 c1), FP = 1 (f3 c0), FN = 1 (f1 c2): micro F1 = 2*2 / (2*2 + 1 + 1) = 2/3.
# Exact match: f0 yes, f1 no, f2 yes (no characters, nothing predicted), f3 no (no characters, one predicted).
HAND = {"char_f1": 2 / 3, "frame_acc": 0.5}


def test_character_scores_hand_computed_binary():
    m = CharacterScores(3, input_format="binary")
    m.update(PRED, TARGET)
    assert _scores(m) == pytest.approx(HAND)


def test_character_scores_logits_and_probs_threshold_is_strict():
    logits = torch.where(PRED.bool(), torch.tensor(3.0), torch.tensor(-3.0))
    logits[2, 1] = 0.0  # sigmoid(0) = 0.5 is not > 0.5: predicted absent, frame 2 stays exact
    m = CharacterScores(3, input_format="logits")
    m.update(logits, TARGET)
    assert _scores(m) == pytest.approx(HAND)

    probs = torch.sigmoid(logits)
    probs[2, 1] = 0.5
    m = CharacterScores(3, input_format="probs")
    m.update(probs, TARGET.int())  # any numeric target dtype
    assert _scores(m) == pytest.approx(HAND)


def test_character_scores_exact_match_needs_every_character():
    target = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]])
    pred = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 1]])  # one missed, one extra: both frames wrong
    m = CharacterScores(4, input_format="binary")
    m.update(pred, target)
    s = _scores(m)
    assert s["frame_acc"] == 0.0
    assert s["char_f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))


def test_character_scores_zero_division_and_empty_frames():
    zeros = torch.zeros(5, 3)
    m = CharacterScores(3, input_format="binary")
    m.update(zeros, zeros)
    assert _scores(m) == {"char_f1": 0.0, "frame_acc": 1.0}  # sklearn's default: undefined F1 -> 0
    m = CharacterScores(3, input_format="binary", zero_division=1.0)
    m.update(zeros, zeros)
    assert _scores(m)["char_f1"] == 1.0
    m = CharacterScores(3, input_format="binary")
    m.update(torch.ones(5, 3), zeros)  # everything predicted, nothing there
    assert _scores(m) == {"char_f1": 0.0, "frame_acc": 0.0}


def test_character_scores_random_against_numpy_batches_and_state_merge():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(257, 7)).astype(np.float32)
    target = (rng.random((257, 7)) < 0.3).astype(np.float32)
    target[:20] = 0  # some frames without characters

    pred = (1 / (1 + np.exp(-logits.astype(np.float64)))) > 0.5
    true = target.astype(bool)
    tp, fp, fn = (pred & true).sum(), (pred & ~true).sum(), (~pred & true).sum()
    expected = {"char_f1": 2 * tp / (2 * tp + fp + fn), "frame_acc": (pred == true).all(axis=1).mean()}

    whole = CharacterScores(7)
    whole.update(torch.from_numpy(logits), torch.from_numpy(target))
    assert _scores(whole) == pytest.approx(expected, abs=1e-6)

    # Uneven batches, and two "processes" whose states are summed (what DDP's sum reduction does).
    a, b = CharacterScores(7), CharacterScores(7)
    for lo, hi, m in [(0, 10, a), (10, 100, b), (100, 101, a), (101, 257, b)]:
        m.update(torch.from_numpy(logits[lo:hi]), torch.from_numpy(target[lo:hi]))
    a.merge_state(b)
    assert _scores(a) == pytest.approx(expected, abs=1e-6)

    per_class = whole.per_class_f1().numpy()
    c = 3
    tpc, fpc, fnc = (pred & true)[:, c].sum(), (pred & ~true)[:, c].sum(), (~pred & true)[:, c].sum()
    assert per_class[c] == pytest.approx(2 * tpc / (2 * tpc + fpc + fnc), abs=1e-6)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_character_scores_input_errors():
    with pytest.raises(ValueError, match="input_format"):
        CharacterScores(3, input_format="auto")
    m = CharacterScores(3, input_format="probs")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m.update(torch.tensor([[2.0, -1.0, 0.0]]), torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        m.update(torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="0 and 1"):
        m.update(torch.zeros(1, 3), torch.full((1, 3), 2.0))
    with pytest.raises(ValueError, match="differ"):
        m.update(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(TypeError, match="logits"):
        CharacterScores(3).update(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3))
    with pytest.raises(RuntimeError, match="no frames"):
        CharacterScores(3).compute()


# ---------------------------------------------------------------------------------------------- classifier


def test_classifier_input_forms_and_feature_contract():
    torch.manual_seed(0)
    clf = CharacterClassifier(6).eval()
    assert 100_000 <= sum(p.numel() for p in clf.parameters()) <= 300_000
    frames, _ = make_frames(3, seed=5, size=64)
    u8 = torch.from_numpy(frames)
    f32 = u8.permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        out = clf(u8)
        assert out.shape == (3, 6)
        torch.testing.assert_close(clf(f32), out)
        torch.testing.assert_close(clf(frames), out)  # numpy uint8 NHWC
        feats = clf.features(u8)
    assert isinstance(clf.num_features, int) and feats.shape == (3, clf.num_features)
    with pytest.raises(ValueError, match="NHWC"):
        clf(u8.permute(0, 3, 1, 2).contiguous())  # uint8 NCHW
    with pytest.raises(ValueError, match="NCHW"):
        clf(f32.permute(0, 2, 3, 1))  # float NHWC
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        clf(f32 * 255)
    with pytest.raises(TypeError, match="dtype"):
        clf(u8.permute(0, 3, 1, 2).to(torch.int32))


def test_classifier_trains_to_high_accuracy(trained, data):
    clf, report = trained
    (_, _), (xv, yv) = data
    assert report["best_val_frame_acc"] >= 0.95, report
    assert report["best_val_char_f1"] >= 0.97, report
    assert report["train_loss"][-1] < report["train_loss"][0]
    assert not clf.training
    # the kept epoch is the first one with the best validation frame accuracy (ModelCheckpoint, strict >)
    assert report["best_epoch"] == int(np.argmax(report["val_frame_acc"]))
    assert len(report["train_loss"]) == len(report["val_frame_acc"]) == report["epochs"] == 6
    # The returned weights are the best epoch's: re-scoring the validation frames reproduces its accuracy.
    m = CharacterScores(clf.num_classes)
    m.update(clf.predict_logits(xv), yv)
    assert float(m.compute()["frame_acc"]) == pytest.approx(report["best_val_frame_acc"], abs=1e-6)


def test_training_is_deterministic_and_leaves_global_rng_alone():
    x, y = make_frames(64, seed=3)
    state = torch.random.get_rng_state()
    a, _ = train_character_classifier(x, y, epochs=1, batch_size=16, seed=7, **TINY)
    assert torch.equal(torch.random.get_rng_state(), state)
    b, _ = train_character_classifier(x, y, epochs=1, batch_size=16, seed=7, **TINY)
    c, _ = train_character_classifier(x, y, epochs=1, batch_size=16, seed=8, **TINY)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_training_runs_the_lightning_system(monkeypatch):
    """The classifier trains as a LightningModule under a lightning.Trainer, the best epoch kept by a
    ModelCheckpoint on val/frame_acc; no hand-written loop."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    seen = []
    real_fit = L.Trainer.fit

    def spy(trainer, model, *args, **kwargs):
        checkpoints = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
        seen.append((type(model), trainer.max_epochs, trainer.logger,
                     [(cb.monitor, cb.mode) for cb in checkpoints]))
        return real_fit(trainer, model, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", spy)
    x, y = make_frames(48, seed=4)
    xv, yv = make_frames(16, seed=5)
    _, report = train_character_classifier(x, y, val_frames=xv, val_labels=yv, epochs=2, batch_size=16, **TINY)
    assert seen == [(CharacterClassifierSystem, 2, None, [("val/frame_acc", "max")])]
    assert report["num_val_frames"] == 16 and report["best_epoch"] in (0, 1)


def test_augmentation_shifts_and_flips_within_bounds():
    from storyexp.metrics.classifier_system import augment

    x = torch.rand(64, 3, 8, 8)
    assert torch.equal(augment(x, torch.Generator().manual_seed(0), max_shift=0, hflip=False), x)
    flipped = augment(x, torch.Generator().manual_seed(0), max_shift=0, hflip=True)
    same = [(flipped[i] == x[i]).all() for i in range(64)]
    mirrored = [(flipped[i] == x[i].flip(-1)).all() for i in range(64)]
    assert all(a or b for a, b in zip(same, mirrored)) and 10 < sum(mirrored) < 54
    shifted = augment(x, torch.Generator().manual_seed(1), max_shift=2, hflip=False)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    for i in range(8):  # every output is an 8x8 window of the edge-padded input, offset by at most 2 px
        windows = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(padded[i, :, dy : dy + 8, dx : dx + 8], shifted[i])]
        assert windows, i


def test_train_input_errors():
    x, y = make_frames(8, seed=0)
    with pytest.raises(ValueError, match="differ in length"):
        train_character_classifier(x, y[:5], epochs=1)
    with pytest.raises(TypeError, match="uint8"):
        train_character_classifier(x.astype(np.float32), y, epochs=1)
    with pytest.raises(ValueError, match="both"):
        train_character_classifier(x, y, val_frames=x, epochs=1)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_load_round_trip(trained, tmp_path, suffix):
    clf, _ = trained
    clf.class_names = ["circle", "square", "triangle", "cross"]
    path = save_classifier(clf, tmp_path / "sub" / f"clf{suffix}")
    assert path.is_file() and not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    loaded = load_classifier(path)
    assert loaded.config == clf.config and not loaded.training
    x, _ = make_frames(10, seed=9, size=48)
    with torch.no_grad():
        assert torch.equal(loaded(x), clf(x))
        assert torch.equal(loaded.features(x), clf.features(x))
    if suffix == ".pt":  # plain dict of tensors and Python types: loadable with weights_only=True
        payload = torch.load(path, weights_only=True)
        assert payload["format"] == "storyexp.character_classifier"
    assert load_classifier_with_record(path)[1] is None  # written without a record
    record = {"kind": "character_classifier", "format_version": 1, "config": {"epochs": 6, "channels": [16, 32]},
              "data": {"sha256": "ab"}, "quality": {"val_frame_acc": 0.97}}
    save_classifier(clf, path, record=record)
    again, stored = load_classifier_with_record(path)
    assert stored == record and again.config == clf.config


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_classifier(missing)
    bad = tmp_path / "bad.pt"
    torch.save({"something": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="bad.pt"):
        load_classifier(bad)


# ---------------------------------------------------------------------------------------------- fid_demo


def test_feature_extractor_contract(trained):
    clf, _ = trained
    fe = ClassifierFeatureExtractor(clf)
    assert isinstance(fe.num_features, int) and fe.num_features == clf.num_features
    assert not any(p.requires_grad for p in fe.parameters())
    fe.train()
    assert not fe.training
    x = torch.rand(2, 3, 40, 40)
    out = fe(x)
    assert out.shape == (2, fe.num_features) and out.dtype == torch.float64
    torch.testing.assert_close(out, clf.features(x).double())


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_demo_fid_identical_shifted_and_errors(trained, data):
    clf, _ = trained
    (x, _), (xv, _) = data
    fid = DemoFID(clf)

    with pytest.raises(RuntimeError, match="at least 2"):
        fid.compute()
    fid.update(xv[:1], real=True)
    fid.update(xv[:5], real=False)
    with pytest.raises(RuntimeError, match="1 real"):
        fid.compute()

    fid = DemoFID(clf)
    fid.update(xv, real=True)
    fid.update(torch.from_numpy(xv[::-1].copy()), real=False)  # same set, other order, torch input
    same = float(fid.compute())
    assert abs(same) < 1e-6

    fid.reset()  # keeps the real statistics (reset_real_features=False)
    assert int(fid.real_features_num_samples) == len(xv)
    fid.update(x[:300], real=False)  # another sample of the same distribution
    other_sample = float(fid.compute())

    fid.reset()
    shifted = xv.copy()
    shifted[..., 0] = 255 - shifted[..., 0]  # red channel inverted: a different distribution of colours
    fid.update(shifted, real=False)
    far = float(fid.compute())
    assert same < other_sample < far, (same, other_sample, far)

    assert isinstance(fid.compute(), torch.Tensor) and fid.compute().dtype == torch.float64

    # set_dtype(float64) converts the metric's own copy of the network, never the caller's classifier, and the
    # copy then runs in float64 with the same result.
    fid.set_dtype(torch.float64)
    assert next(clf.parameters()).dtype == torch.float32
    assert next(fid.inception.parameters()).dtype == torch.float64
    fid.reset()
    fid.update(shifted, real=False)
    assert float(fid.compute()) == pytest.approx(far, rel=1e-5)

    fid.reset_real()
    assert int(fid.real_features_num_samples) == 0

    with pytest.raises(ValueError, match="NHWC"):
        fid.update(torch.from_numpy(xv).permute(0, 3, 1, 2), real=True)


# ---------------------------------------------------------------------------------------------- evaluator


def test_classifier_metrics(trained, data):
    """``characters`` and ``fid_demo`` as the evaluation callbacks build them (storyexp.metrics.registry)."""
    clf, report = trained
    (x, y), (xv, yv) = data
    chars, fid = CharacterMetric(clf, batch_size=64), ClassifierFIDMetric(clf, batch_size=64)
    assert isinstance(chars, StoryMetric) and isinstance(fid, StoryMetric)
    for lo in range(0, len(xv), 100):  # "perfect generator": generated == real
        for metric in (chars, fid):
            metric.update(xv[lo : lo + 100], xv[lo : lo + 100], yv[lo : lo + 100], captions=["unused"] * 100)
    perfect = {**chars.compute(), **fid.compute()}
    # a project-trained classifier reports the demo's own keys; a published one the papers' names
    assert set(perfect) == {"fid_demo", "char_f1_demo", "frame_acc_demo"}
    assert all(isinstance(v, float) for v in perfect.values())
    assert abs(perfect["fid_demo"]) < 1e-6
    assert perfect["frame_acc_demo"] == pytest.approx(report["best_val_frame_acc"], abs=1e-6)
    clf.published = True
    try:
        assert set(CharacterMetric(clf).keys.values()) == {"char_f1", "frame_acc"}
    finally:
        clf.published = False

    # A generator that ignores the story: frames of other stories. Labels no longer match.
    chars.reset(), fid.reset()
    chars.update(x[:len(xv)], xv, yv)
    fid.update(x[:len(xv)], xv, yv)
    unrelated = {**chars.compute(), **fid.compute()}
    assert unrelated["frame_acc_demo"] < 0.6 and unrelated["char_f1_demo"] < 0.6
    assert unrelated["fid_demo"] > perfect["fid_demo"]

    with pytest.raises(ValueError, match="labels"):
        chars.update(xv[:4], xv[:4])
    with pytest.raises(ValueError, match="differ"):
        chars.update(xv[:4], xv[:3], yv[:3])
    with pytest.raises(ValueError, match="real frames"):
        fid.update(xv[:4], None)


def test_metric_suite_merges_and_refuses_duplicate_names(trained, data):
    clf, _ = trained
    (_, _), (xv, yv) = data
    suite = StoryMetricSuite([CharacterMetric(clf), ClassifierFIDMetric(clf)])
    suite.update(xv[:50], xv[:50], yv[:50])
    assert set(suite.compute()) == {"fid_demo", "char_f1_demo", "frame_acc_demo"}
    dup = StoryMetricSuite({"a": CharacterMetric(clf), "b": CharacterMetric(clf)})
    dup.update(xv[:50], xv[:50], yv[:50])
    with pytest.raises(ValueError, match="char_f1_demo|frame_acc_demo"):
        dup.compute()
    assert not math.isnan(suite.compute()["char_f1_demo"])


# ---------------------------------------------------------------------------------------------- acceptance (slow)


@pytest.mark.slow
def test_classifier_on_the_demo_dataset_reaches_098():
    """Default settings on ~15k demo training frames: >= 0.98 frame accuracy on held-out demo frames."""
    from storyexp.data import demo

    stories = demo.generate_demo_stories(seed=0, n_train=3000, n_val=100, n_test=200)

    def split(name):
        frames = np.stack([f for s in stories[name] for f in s.frames])
        return frames, np.concatenate([s.labels for s in stories[name]]).astype(np.float32)

    (x, y), (xv, yv), (xt, yt) = split("train"), split("val"), split("test")
    clf, report = train_character_classifier(x, y, val_frames=xv, val_labels=yv, seed=0)
    m = CharacterScores(clf.num_classes)
    m.update(clf.predict_logits(xt), yt)
    scores = {k: float(v) for k, v in m.compute().items()}
    print(f"demo classifier: {report['train_time_s']:.1f}s for {len(x)} frames x {report['epochs']} epochs, {scores}")
    assert scores["frame_acc"] >= 0.98 and scores["char_f1"] >= 0.98
