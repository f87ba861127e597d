"""StoryDALL-E's Inception-v3 character classifier: published checkpoints, preprocessing, training, the cache.

Real torchvision networks at a tiny width (every channel count divided by 8 or 16, built by the same
`build_inception_v3` the loader uses), checkpoints written in the published layout (plain / `module.` /
wrapped state dicts), and the tiny demo set of tests/conftest.py. The independent references are torchvision's
own PIL transforms and feature extractor, and hand-computed losses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor
from PIL import Image
from torch import nn
from torchvision import transforms as T
from torchvision.models import inception as tv_inception

import storyexp.metrics.classifier_system as classifier_system
from storyexp.errors import ConfigurationError, MissingResourceError
from storyexp.metrics import ensure_classifier, load_classifier_with_record, load_prepared_classifier
from storyexp.metrics.character_classifier import CharacterClassifier, save_classifier
from storyexp.metrics.classifier_cache import (
    CLASSIFIER_METRICS,
    INCEPTION_SETTINGS,
    classifier_settings,
    expected_record,
)
from storyexp.metrics.classifier_system import InceptionClassifierSystem, train_character_classifier
from storyexp.metrics.inception_classifier import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    InceptionCharacterClassifier,
    build_inception_v3,
    load_published_classifier,
)
from storyexp.tasks import build_datamodule
from storyexp.tasks.train_classifier import train_classifier
from storyexp.utils.cache import make_record
from storyexp.utils.loading import CheckpointMismatchError, UnsafeFileError

from .conftest import TINY_DEMO, compose_cfg

K = 16  # width divisor of the tiny networks (2-channel stem, 128 pooled features)
DEMO_CHARACTERS = 6
HEADS = {"fc.weight", "fc.bias", "AuxLogits.fc.weight", "AuxLogits.fc.bias"}


def frames(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def tiny_published_net(num_classes: int, seed: int = 0) -> tv_inception.Inception3:
    """A tiny network in the published layout whose BatchNorm statistics are those of some inputs (so eval mode
    matters and the logits differ between frames)."""
    torch.manual_seed(seed)
    net = build_inception_v3(num_classes, width_divisor=K, init_weights=True)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batch
    with torch.no_grad():
        net.train()(torch.randn(4, 3, 299, 299))
    return net.eval()


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------------ network


def test_every_channel_count_divides_by_the_tiny_widths():
    for k in (2, 4, 8, 16):
        net = build_inception_v3(9, width_divisor=k)
        assert net.Conv2d_1a_3x3.conv.weight.shape == (32 // k, 3, 3, 3)  # the 3 image channels kept
        assert (net.fc.in_features, net.AuxLogits.fc.in_features) == (2048 // k, 768 // k)
        assert net.transform_input is False and net.aux_logits
        out = net.train()(torch.zeros(2, 3, 299, 299))  # every block's channels fit together
        assert out.logits.shape == out.aux_logits.shape == (2, 9)
    with pytest.raises(ValueError, match="width_divisor"):
        build_inception_v3(9, width_divisor=32)  # the 80-channel stem conv is not divisible by 32


def test_full_width_is_torchvisions_inception_v3_layout():
    with torch.device("meta"):  # shapes and names only
        ours = build_inception_v3(9).state_dict()
        reference = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict()
    assert list(ours) == list(reference)  # the same key names, in the same order
    assert {k: tuple(v.shape) for k, v in ours.items() if k not in HEADS} == \
        {k: tuple(v.shape) for k, v in reference.items() if k not in HEADS}
    assert (ours["fc.weight"].shape, ours["AuxLogits.fc.weight"].shape) == ((9, 2048), (9, 768))
    assert ours["fc.bias"].shape == ours["AuxLogits.fc.bias"].shape == (9,)


@pytest.mark.parametrize("hw", [(96, 128), (128, 96), (64, 64)])
def test_preprocessing_is_torchvisions_resize_centercrop_normalize_on_pil(hw):
    clf = InceptionCharacterClassifier(3, width_divisor=K)
    x = frames(3, *hw, seed=hw[0])
    reference = T.Compose([T.Resize(299), T.CenterCrop(299), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    want = torch.stack([reference(Image.fromarray(f)) for f in x])
    level = 1 / 255 / min(IMAGENET_STD) + 1e-5  # one grey level after normalisation
    got = clf.preprocess(x)
    assert got.shape == want.shape == (3, 3, 299, 299) and got.dtype == torch.float32
    diff = (got - want).abs()
    # the uint8 resize rounds like PIL but for a fraction of a percent of the values, by one level
    assert float(diff.max()) <= level and float((diff > 1e-5).float().mean()) < 0.01
    as_float = clf.preprocess(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)  # float NCHW in [0, 1]
    assert float((as_float - want).abs().max()) <= level
    with pytest.raises(ValueError, match="NHWC"):
        clf.preprocess(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


@pytest.mark.filterwarnings("ignore:NOTE. The nodes obtained by tracing")
def test_features_are_the_pooled_input_of_fc():
    clf = InceptionCharacterClassifier(4, width_divisor=K).eval()
    x = frames(2, 48, 64)
    extractor = create_feature_extractor(
        clf.net, return_nodes={"flatten": "pooled", "fc": "logits"})
    with torch.no_grad():
        want = extractor(clf.preprocess(x))
        assert clf.features(x).shape == (2, clf.num_features) == (2, 2048 // K)
        assert torch.allclose(clf.features(x), want["pooled"], atol=1e-6)
        assert torch.allclose(clf(x), want["logits"], atol=1e-6)
    assert clf.predict_logits(x, batch_size=1).shape == (2, 4) and not clf.training


# ----------------------------------------------------------------------------------- published checkpoints


@pytest.mark.parametrize("layout", ["plain", "module", "wrapped"])
def test_a_published_checkpoint_loads_and_gives_the_models_logits(tmp_path, layout):
    net = tiny_published_net(9)
    state = net.state_dict()
    if layout == "module":
        state = nn.DataParallel(net).state_dict()  # what torch.save(model.state_dict()) writes under DataParallel
        assert all(k.startswith("module.") for k in state)
    payload = {"state_dict": state, "epoch": 10} if layout == "wrapped" else state
    path = tmp_path / f"{layout}.pt"
    torch.save(payload, path)

    clf = load_published_classifier(path, num_classes=9)
    assert isinstance(clf, InceptionCharacterClassifier) and clf.published and not clf.training
    assert (clf.num_classes, clf.width_divisor, clf.num_features) == (9, K, 2048 // K)
    x = frames(3, 64, 80)
    with torch.no_grad():
        prepared = clf.preprocess(x)
        want = net(prepared)
        assert torch.equal(clf(x), want)  # eval mode: the main logits only
        assert float((want[0] - want[1]).abs().max()) > 1e-3  # they depend on the frame
        assert torch.allclose(clf.predict_logits(x, batch_size=2), want, rtol=1e-4, atol=1e-5)  # other kernels


def test_published_checkpoint_errors_are_one_line_naming_the_file(tmp_path):
    net = tiny_published_net(7)
    path = tmp_path / "clf7.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(ConfigurationError) as err:  # a Flintstones classifier on a 9-character dataset
        load_published_classifier(path, class_names=[f"c{i}" for i in range(9)], dataset="pororo")
    message = one_line(err)
    assert str(path) in message and "7 characters" in message and "has 9" in message

    state = net.state_dict()
    state["Mixed_5b.branch1x1.conv.weightt"] = state.pop("Mixed_5b.branch1x1.conv.weight")
    torch.save(state, tmp_path / "renamed.pt")
    with pytest.raises(CheckpointMismatchError) as err:
        load_published_classifier(tmp_path / "renamed.pt", num_classes=7)
    message = one_line(err)
    assert str(tmp_path / "renamed.pt") in message and "missing keys (1): Mixed_5b.branch1x1.conv.weight" in message
    assert "unexpected keys (1)" in message

    stripped = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    torch.save(stripped, tmp_path / "nofc.pt")
    with pytest.raises(CheckpointMismatchError, match="missing keys .*fc.bias, fc.weight") as err:
        load_published_classifier(tmp_path / "nofc.pt", num_classes=7)
    assert str(tmp_path / "nofc.pt") in one_line(err)

    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ConfigurationError, match="not a state dict") as err:
        load_published_classifier(tmp_path / "list.pt")
    assert str(tmp_path / "list.pt") in one_line(err)

    torch.save(net, tmp_path / "pickled_model.pt")  # the whole module: refused, nothing of it runs
    with pytest.raises(UnsafeFileError) as err:
        load_published_classifier(tmp_path / "pickled_model.pt")
    assert str(tmp_path / "pickled_model.pt") in one_line(err)


def test_a_missing_published_checkpoint_says_where_it_is_published(tmp_path):
    missing = tmp_path / "pororo_classifier.pt"
    with pytest.raises(MissingResourceError) as err:
        load_published_classifier(missing, dataset="pororo")
    message = one_line(err)
    assert str(missing) in message and "1xK6JOgQn_INQ3mBrA338BC2KoeM0TagR" in message
    assert "task=train_classifier data=pororo eval/classifier=inception_v3" in message
    with pytest.raises(MissingResourceError) as err:
        load_published_classifier(missing, dataset="flintstones")
    message = one_line(err)
    assert "published by StoryGPT-V" in message
    assert "storygpt-v.s3.amazonaws.com/checkpoints/flintstones/eval/classifier_char.pt" in message


# ------------------------------------------------------------------------------------------------ the cache


@pytest.fixture
def trainings(monkeypatch) -> list[str]:
    """The archs of the classifier trainings run (each is a lightning fit)."""
    calls: list[str] = []
    real = classifier_system.train_character_classifier

    def counted(*args, **kwargs):
        calls.append(kwargs.get("arch", "small_cnn"))
        return real(*args, **kwargs)

    monkeypatch.setattr(classifier_system, "train_character_classifier", counted)
    return calls


def demo_cfg(tmp_path: Path, data_dir: Path, *extra: str):
    shared = tmp_path / "shared"
    return compose_cfg([*TINY_DEMO, f"eval.classifier.path={shared}/clf.pt", *extra], tmp_path, data_dir=data_dir)


def datamodule(cfg):
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_composing_eval_classifier_inception_v3_gives_the_published_recipe(tmp_path):
    cfg = compose_cfg([*TINY_DEMO, "eval/classifier=inception_v3"], tmp_path)
    clf = cfg.eval.classifier
    assert (clf.arch, clf.checkpoint, clf.min_val_frame_acc, clf.init_weights) == ("inception_v3", None, None, None)
    assert (clf.epochs, clf.batch_size, clf.lr, clf.aux_weight, clf.hflip, clf.input_size) == \
        (50, 32, 1e-5, 0.4, True, 299)
    assert (clf.weight_decay, clf.seed, clf.width_divisor, dict(clf.trainer)) == (0.0, 0, 1, {})
    assert clf.path.endswith("/demo/character_classifier_inception_v3_demo.pt")
    assert clf.run_path.endswith("/out/character_classifier_inception_v3_demo.pt")
    assert classifier_settings(clf) == INCEPTION_SETTINGS  # the yaml and the code's defaults agree
    record = expected_record(clf, ["a", "b"], {"sha256": "x"})["config"]
    assert record["arch"] == "inception_v3" and {"aux_weight", "init_weights", "width_divisor"} <= set(record)
    small = compose_cfg(TINY_DEMO, tmp_path).eval.classifier
    assert small.arch == "small_cnn"
    assert set(expected_record(small, ["a"], {})["config"]) == {  # the record it had before: old caches stay valid
        "epochs", "batch_size", "lr", "seed", "weight_decay", "augment", "max_shift", "hflip", "input_size",
        "channels", "num_classes", "class_names"}
    assert CLASSIFIER_METRICS == ("characters", "fid_demo")


def test_a_published_checkpoint_is_used_as_it_is_and_trains_nothing(shared_data_dir, tmp_path, trainings):
    path = tmp_path / "published.pt"
    torch.save(tiny_published_net(DEMO_CHARACTERS).state_dict(), path)
    cfg = demo_cfg(tmp_path, shared_data_dir, "eval/classifier=inception_v3", f"eval.classifier.checkpoint={path}")
    dm = datamodule(cfg)
    assert ensure_classifier(cfg.eval, dm, output_dir=cfg.paths.output_dir) == path
    classifier = load_prepared_classifier(cfg.eval.classifier, dm, output_dir=cfg.paths.output_dir)
    assert classifier.published is True and isinstance(classifier, InceptionCharacterClassifier)
    assert classifier.class_names == list(cfg.data.characters) and not classifier.training
    assert trainings == [] and not Path(cfg.eval.classifier.path).exists()
    # the task checks it and trains nothing
    task = demo_cfg(tmp_path, shared_data_dir, "task=train_classifier", "eval=loss_only",
                    "eval/classifier=inception_v3", f"eval.classifier.checkpoint={path}")
    assert train_classifier(task) == {} and trainings == []
    # the classifier is needed for either metric name, not otherwise
    assert ensure_classifier({**dict(cfg.eval), "metrics": ["fid_demo"]}, dm, output_dir=tmp_path) == path
    assert ensure_classifier({**dict(cfg.eval), "metrics": ["fid"]}, dm, output_dir=tmp_path) is None

    torch.save(tiny_published_net(7).state_dict(), tmp_path / "seven.pt")
    wrong = demo_cfg(tmp_path, shared_data_dir, "eval/classifier=inception_v3",
                     f"eval.classifier.checkpoint={tmp_path / 'seven.pt'}")
    with pytest.raises(ConfigurationError) as err:
        ensure_classifier(wrong.eval, dm, output_dir=tmp_path)
    assert "seven.pt classifies 7 characters but the dataset demo has 6" in one_line(err)
    missing = demo_cfg(tmp_path, shared_data_dir, "eval/classifier=inception_v3",
                       f"eval.classifier.checkpoint={tmp_path / 'none.pt'}")
    with pytest.raises(MissingResourceError, match="none.pt.*task=train_classifier data=demo"):
        load_prepared_classifier(missing.eval.classifier, dm, output_dir=tmp_path)
    small = demo_cfg(tmp_path, shared_data_dir, f"eval.classifier.checkpoint={path}")  # small_cnn + a checkpoint
    with pytest.raises(ConfigurationError, match="eval/classifier=inception_v3"):
        ensure_classifier(small.eval, dm, output_dir=tmp_path)
    assert trainings == []


def test_a_project_trained_small_cnn_is_not_published(shared_data_dir, tmp_path, trainings):
    cfg = demo_cfg(tmp_path, shared_data_dir, "eval.classifier.epochs=1", "eval.classifier.min_val_frame_acc=null")
    dm = datamodule(cfg)
    ensure_classifier(cfg.eval, dm, output_dir=cfg.paths.output_dir)
    classifier = load_prepared_classifier(cfg.eval.classifier, dm, output_dir=cfg.paths.output_dir)
    assert isinstance(classifier, CharacterClassifier) and classifier.published is False
    assert trainings == ["small_cnn"]


def test_inception_v3_trains_through_the_cache_with_its_record(shared_data_dir, tmp_path, trainings):
    init = tmp_path / "imagenet_tiny.pt"  # a (tiny) torchvision ImageNet state dict: 1000-class heads
    imagenet = build_inception_v3(1000, width_divisor=K)
    torch.save(imagenet.state_dict(), init)
    overrides = ["eval/classifier=inception_v3", "data.limit_train=2", "data.limit_val=2",
                 f"eval.classifier.width_divisor={K}", "eval.classifier.epochs=1", "eval.classifier.batch_size=5",
                 "eval.classifier.lr=1e-3", "eval.classifier.seed=3", "eval.classifier.hflip=false",
                 "eval.classifier.weight_decay=1e-6", "eval.classifier.aux_weight=0.5",
                 f"eval.classifier.init_weights={init}", "+eval.classifier.trainer.max_epochs=1"]
    cfg = demo_cfg(tmp_path, shared_data_dir, *overrides)
    dm = datamodule(cfg)
    path = ensure_classifier(cfg.eval, dm, output_dir=cfg.paths.output_dir)
    assert path == Path(cfg.eval.classifier.run_path) and path.name == "character_classifier_inception_v3_demo.pt"
    assert trainings == ["inception_v3"]
    classifier, record = load_classifier_with_record(path)
    config = record["config"]
    assert config["arch"] == "inception_v3" and config["class_names"] == list(cfg.data.characters)
    assert (config["width_divisor"], config["epochs"], config["batch_size"], config["lr"], config["seed"]) == \
        (K, 1, 5, 1e-3, 3)
    assert (config["hflip"], config["weight_decay"], config["aux_weight"], config["init_weights"],
            config["input_size"]) == (False, 1e-6, 0.5, str(init), 299)
    assert record["quality"]["num_val_frames"] == 10 and "val_frame_acc" in record["quality"]
    assert isinstance(classifier, InceptionCharacterClassifier) and classifier.width_divisor == K

    prepared = load_prepared_classifier(cfg.eval.classifier, dm, output_dir=cfg.paths.output_dir)
    assert prepared.published is False and isinstance(prepared, InceptionCharacterClassifier)
    assert ensure_classifier(cfg.eval, dm, output_dir=cfg.paths.output_dir) == path and len(trainings) == 1
    other = demo_cfg(tmp_path, shared_data_dir, *overrides, "eval.classifier.aux_weight=0.4")
    with pytest.raises(ConfigurationError, match="config differs: aux_weight: 0.5 -> 0.4"):
        load_prepared_classifier(other.eval.classifier, dm, output_dir=other.paths.output_dir)


# ----------------------------------------------------------------------------------------------- training


def test_the_training_loss_is_main_plus_aux_weight_times_aux():
    system = InceptionClassifierSystem(3, width_divisor=K, hflip=False, aux_weight=0.4, seed=1).train()
    x = torch.from_numpy(frames(4, 40, 56, seed=5))
    y = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.float32)

    torch.manual_seed(0)  # Inception's dropout
    got = system.losses(system.train_transform(x), y)
    # by hand: Resize(299) (shorter side, no crop) with torchvision on PIL, ImageNet normalisation, both losses
    resize = T.Compose([T.Resize(299), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    xb = torch.stack([resize(Image.fromarray(f)) for f in x.numpy()])
    assert system.train_transform(x).shape == xb.shape == (4, 3, 299, 418)
    torch.manual_seed(0)
    logits, aux = system.classifier.net(system.train_transform(x))
    bce = nn.functional.binary_cross_entropy_with_logits
    want = bce(logits, y) + 0.4 * bce(aux, y)
    assert torch.allclose(got["loss"], want, atol=1e-6) and float(got["aux"].detach()) > 0
    assert torch.allclose(got["loss"], got["main"] + 0.4 * got["aux"], atol=1e-7)
    # the transform is torchvision's Resize on PIL images up to uint8 rounding
    assert float((system.train_transform(x) - xb).abs().max()) <= 1 / 255 / min(IMAGENET_STD) + 1e-5
    got["loss"].backward()  # the auxiliary head is trained
    assert float(system.classifier.net.AuxLogits.fc.weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="299"):
        InceptionClassifierSystem(3, width_divisor=K, input_size=224)


def test_imagenet_init_loads_all_but_the_heads(tmp_path):
    imagenet = build_inception_v3(1000, width_divisor=K)
    torch.save({"module." + k: v for k, v in imagenet.state_dict().items()}, tmp_path / "imagenet.pt")
    system = InceptionClassifierSystem(5, width_divisor=K, init_weights=str(tmp_path / "imagenet.pt"))
    state = system.classifier.net.state_dict()
    for key, value in imagenet.state_dict().items():
        if key not in HEADS:
            assert torch.equal(state[key], value), key
    assert state["fc.weight"].shape == (5, 2048 // K)
    with pytest.raises(CheckpointMismatchError, match="imagenet.pt"):  # another width does not fit
        InceptionClassifierSystem(5, width_divisor=8, init_weights=str(tmp_path / "imagenet.pt"))
    with pytest.raises(MissingResourceError, match="Inception_V3_Weights.IMAGENET1K_V1"):
        InceptionClassifierSystem(5, width_divisor=K, init_weights=str(tmp_path / "none.pt"))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_inception_training_runs_and_the_file_round_trips(tmp_path, suffix):
    x, xv = frames(6, 32, 40, seed=1), frames(4, 32, 40, seed=2)
    y = (np.random.default_rng(3).random((6, 3)) < 0.5).astype(np.float32)
    yv = (np.random.default_rng(4).random((4, 3)) < 0.5).astype(np.float32)
    clf, report = train_character_classifier(x, y, arch="inception_v3", val_frames=xv, val_labels=yv, epochs=1,
                                             batch_size=3, lr=1e-3, width_divisor=K, class_names=["a", "b", "c"])
    assert isinstance(clf, InceptionCharacterClassifier) and not clf.training and not clf.published
    assert report["best_epoch"] == 0 and len(report["train_loss"]) == 1 and report["num_val_frames"] == 4
    record = make_record("character_classifier", {"arch": "inception_v3", "epochs": 1}, {"sha256": "ab"},
                         {"val_frame_acc": report["best_val_frame_acc"]})
    path = save_classifier(clf, tmp_path / f"clf{suffix}", record=record)
    loaded, stored = load_classifier_with_record(path)
    assert stored == record and loaded.config == clf.config and loaded.config["arch"] == "inception_v3"
    with torch.no_grad():
        assert torch.equal(loaded(xv), clf(xv)) and torch.equal(loaded.features(xv), clf.features(xv))
    with pytest.raises(ValueError, match="unknown classifier arch"):
        train_character_classifier(x, y, arch="resnet")


# ------------------------------------------------------------------------------------ CharacterScores


def test_character_scores_are_torchmetrics_multilabel_metrics_thresholded_like_round():
    from torchmetrics.classification import MultilabelExactMatch, MultilabelF1Score

    from storyexp.metrics import CharacterScores

    m = CharacterScores(3)
    assert isinstance(m.f1, MultilabelF1Score) and isinstance(m.exact_match, MultilabelExactMatch)
    # logits that all lie in [0, 1]: still logits (sigmoid(0.3) > 0.5), never read as probabilities
    logits = torch.tensor([[0.3, 0.0, 1.0], [0.9, 0.2, 0.0]])
    target = torch.tensor([[1, 0, 1], [1, 1, 0]])
    m.update(logits, target)
    original = torch.round(torch.sigmoid(logits))  # eval_char_clf.py: sigmoid(0) = 0.5 rounds to 0
    assert original.tolist() == [[1, 0, 1], [1, 1, 0]]
    assert {k: float(v) for k, v in m.compute().items()} == {"char_f1": 1.0, "frame_acc": 1.0}
    probs = CharacterScores(3, input_format="probs")
    probs.update(torch.tensor([[0.5, 0.500001, 0.2]]), torch.tensor([[0, 1, 0]]))  # 0.5 exactly is absent
    assert float(probs.compute()["frame_acc"]) == 1.0


@pytest.mark.filterwarnings("ignore:The ..compute.. method")
def test_character_scores_hand_counted_micro_f1_exact_match_and_batches():
    from storyexp.metrics import CharacterScores

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(53, 5, generator=g) * 2
    target = (torch.rand(53, 5, generator=g) < 0.35).long()
    target[:7] = 0
    # by hand, independently of torchmetrics: round(sigmoid), counts, 2TP / (2TP + FP + FN), exact match
    pred = torch.round(torch.sigmoid(logits)).long()
    tp = int(((pred == 1) & (target == 1)).sum())
    fp = int(((pred == 1) & (target == 0)).sum())
    fn = int(((pred == 0) & (target == 1)).sum())
    exact = sum(int(all(p == t for p, t in zip(row_p, row_t))) for row_p, row_t in zip(pred.tolist(),
                                                                                       target.tolist()))
    want = {"char_f1": 2 * tp / (2 * tp + fp + fn), "frame_acc": exact / 53}

    m = CharacterScores(5)
    first = m(logits[:20], target[:20])  # forward: this batch's scores, and accumulated
    m.update(logits[20:], target[20:])
    assert {k: float(v) for k, v in m.compute().items()} == pytest.approx(want, abs=1e-6)
    p20 = pred[:20]
    t20 = target[:20]
    tp20 = int(((p20 == 1) & (t20 == 1)).sum())
    fpfn20 = int((p20 != t20).sum())
    assert float(first["char_f1"]) == pytest.approx(2 * tp20 / (2 * tp20 + fpfn20), abs=1e-6)
    assert float(first["frame_acc"]) == pytest.approx(float((p20 == t20).all(1).float().mean()), abs=1e-6)
    c = 2
    tpc = int(((pred[:, c] == 1) & (target[:, c] == 1)).sum())
    wrong = int((pred[:, c] != target[:, c]).sum())
    assert float(m.per_class_f1()[c]) == pytest.approx(2 * tpc / (2 * tpc + wrong), abs=1e-6)

    a, b = CharacterScores(5), CharacterScores(5)  # two processes' states, summed
    a.update(logits[:30], target[:30])
    b.update(logits[30:], target[30:])
    a.merge_state(b)
    assert {k: float(v) for k, v in a.compute().items()} == pytest.approx(want, abs=1e-6)
    a.reset()
    with pytest.raises(RuntimeError, match="no frames"):
        a.compute()


def test_character_scores_zero_division_when_there_are_no_positives():
    from storyexp.metrics import CharacterScores

    zeros = torch.zeros(4, 3)
    for zero_division, want in ((0.0, 0.0), (1.0, 1.0)):
        m = CharacterScores(3, input_format="binary", zero_division=zero_division)
        m.update(zeros, zeros)
        assert float(m.compute()["char_f1"]) == want and float(m.compute()["frame_acc"]) == 1.0
        assert m.per_class_f1().tolist() == [want] * 3
    m = CharacterScores(3, input_format="binary", zero_division=float("nan"))
    m.update(zeros, zeros)
    assert np.isnan(float(m.compute()["char_f1"]))
    m.update(torch.tensor([[1.0, 0.0, 0.0]]), torch.zeros(1, 3))  # one false positive: F1 is 0, defined
    assert float(m.compute()["char_f1"]) == 0.0
