"""Inception FID (``storyexp.metrics.fid``) against pytorch-fid itself, on a random-weights Inception file.

The weights file is pytorch-fid's FID Inception architecture with random values (fixed seed), so the test runs
without the published weights; both sides load the same file, see the same images and use the same protocol.
"""

from __future__ import annotations

import subprocess
from contextlib import nullcontext as _nullcontext
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_fid import fid_score
from pytorch_fid import inception as pfid_inception
from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3

from storyexp.errors import MissingResourceError
from storyexp.metrics import StoryFID, StoryMetric
from storyexp.metrics import fid as fidmod

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights(fid_weights) -> Path:
    return fid_weights


@pytest.fixture(scope="module")
def inception(weights):
    """storyexp's FID Inception, built once for the module (loading the 2048-feature network costs seconds on 2
    cores); it is in eval mode and only run under no_grad, so no test can change it for another."""
    return fidmod.build_inception(weights)


@pytest.fixture(scope="module")
def pfid_model(weights) -> InceptionV3:
    """pytorch-fid's network on the same file, built once for the module (eval mode, inference only)."""
    return _pfid_model(weights)


def _pfid_model(weights: Path) -> InceptionV3:
    """pytorch-fid's InceptionV3, its download answered with the test's file."""
    sd = torch.load(weights, weights_only=True)
    orig = pfid_inception.load_state_dict_from_url
    pfid_inception.load_state_dict_from_url = lambda url, *a, **k: sd
    try:
        return InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True).eval()
    finally:
        pfid_inception.load_state_dict_from_url = orig


def _write_folder(root: Path, n: int, seed: int, sizes: list[tuple[int, int]]) -> list[Path]:
    """``n`` images of varying sizes in nested folders; one grayscale, one RGBA, some jpg."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        base = rng.integers(0, 256, (1, 1, 3)) * np.ones((h, w, 3))
        arr = np.clip(base + rng.normal(0, 60, (h, w, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        if i == 1:
            img = img.convert("L")
        elif i == 2:
            img = img.convert("RGBA")
        sub = root / f"d{i % 3}" / ("deep" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"{i:02d}.{'jpg' if i % 5 == 4 else 'png'}"
        img.save(path)
        paths.append(path)
    return sorted(paths)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    # few images (every one passes Inception at 299 px twice: the command and pytorch-fid), mixed sizes; 5 each
    # still holds every kind _write_folder makes (grayscale, RGBA, jpg, nested and deep folders)
    a = _write_folder(root / "a", 5, 1, [(40, 32), (48, 48), (32, 40)])
    b = _write_folder(root / "b", 5, 2, [(48, 48), (36, 44)])
    return root / "a", a, root / "b", b


def _pfid_stats(model, files, protocol, tmp: Path):
    """pytorch-fid's statistics; for fid64 the PIL 64x64 bilinear resize is done here, on the test side."""
    if protocol == "fid64":
        tmp.mkdir(parents=True, exist_ok=True)
        resized = []
        for i, f in enumerate(files):
            out = tmp / f"{i:03d}.png"
            Image.open(f).convert("RGB").resize((64, 64), Image.BILINEAR).save(out)
            resized.append(str(out))
        return fid_score.calculate_activation_statistics(resized, model, batch_size=8, device="cpu",
                                                         num_workers=0)
    # native: images of different sizes, so one at a time (pytorch-fid cannot collate mixed sizes)
    return fid_score.calculate_activation_statistics([str(f) for f in files], model, batch_size=1,
                                                     device="cpu", num_workers=0)


def _run_cli(*args: str, env_weights: str | None = None) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ)
    env.pop(fidmod.WEIGHTS_ENV, None)
    if env_weights is not None:
        env[fidmod.WEIGHTS_ENV] = env_weights
    env["TORCH_HOME"] = env.get("STORYEXP_TEST_TORCH_HOME", "/nonexistent-storyexp-torch-home")
    return subprocess.run([sys.executable, "-m", "storyexp.metrics.fid", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _last_number(stdout: str) -> float:
    return float(stdout.strip().splitlines()[-1].split()[-1])


class _Recorder:
    """Stands in for the Fréchet distance where a test checks what reaches it, not the distance itself: one
    2048x2048 ``scipy.linalg.sqrtm`` takes ~15 s on two cores. The real distance is checked against pytorch-fid
    end to end in ``test_fid64_command_equals_pytorch_fid`` (slow) and by the 1-vs-2-process eval test."""

    def __init__(self):
        self.calls = []

    def __call__(self, mu1, sigma1, mu2, sigma2):
        self.calls.append((mu1, sigma1, mu2, sigma2))
        return 1.25


def test_fid64_command_statistics_equal_pytorch_fid(weights, pfid_model, folders, tmp_path, monkeypatch, capsys):
    """fid64: what the command hands pytorch-fid's distance equals pytorch-fid's own statistics of the same images
    (after the PIL 64x64 resize); the distance itself is pytorch-fid's function (the full value, through a
    subprocess, is compared in the slow test below: each 2048x2048 sqrtm costs ~20 s on 2 cores)."""
    dir_a, files_a, dir_b, files_b = folders
    rec = _Recorder()
    monkeypatch.setattr(fidmod, "frechet_distance", rec)
    assert fidmod.main([str(dir_a), str(dir_b), "--protocol", "fid64", "--weights", str(weights),
                        "--batch-size", "4"]) == 0
    stdout = capsys.readouterr().out
    assert stdout.strip().splitlines()[-1].startswith("fid64 ") and _last_number(stdout) == 1.25
    model = pfid_model
    for (mu, s), files, name in ((rec.calls[0][:2], files_a, "ra"), (rec.calls[0][2:], files_b, "rb")):
        pmu, ps = _pfid_stats(model, files, "fid64", tmp_path / name)
        np.testing.assert_allclose(mu, pmu, rtol=1e-5, atol=1e-6 * np.abs(pmu).max())
        np.testing.assert_allclose(s, ps, rtol=1e-4, atol=1e-6 * np.abs(ps).max())


@pytest.mark.slow
def test_fid64_command_equals_pytorch_fid(weights, pfid_model, folders, tmp_path):
    """The command (a subprocess, real Fréchet distance) against pytorch-fid on the same file and images."""
    dir_a, files_a, dir_b, files_b = folders
    stats_out = tmp_path / "a_stats.npz"
    res = _run_cli(str(dir_a), str(dir_b), "--protocol", "fid64", "--weights", str(weights),
                   "--batch-size", "4", "--save-stats", str(stats_out))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1].startswith("fid64 ")
    ours = _last_number(res.stdout)

    model = pfid_model
    mu1, s1 = _pfid_stats(model, files_a, "fid64", tmp_path / "ra")
    mu2, s2 = _pfid_stats(model, files_b, "fid64", tmp_path / "rb")
    theirs = float(fid_score.calculate_frechet_distance(mu1, s1, mu2, s2))
    print(f"fid64: storyexp {ours!r} pytorch-fid {theirs!r} diff {ours - theirs:.3g}")
    assert theirs > 1e-3
    # 10 images in 2048 dimensions: singular covariances, where scipy's sqrtm of the product (pytorch-fid) carries
    # ~1e-6 relative error; the eigendecomposition route is the closer one to the exact value
    # (test_frechet_distance_equals_pytorch_fids_and_the_exact_value)
    assert ours == pytest.approx(theirs, rel=1e-5)
    with np.load(stats_out) as f:  # pytorch-fid's format
        np.testing.assert_allclose(f["mu"], mu1, rtol=1e-5, atol=1e-6 * np.abs(mu1).max())
        np.testing.assert_allclose(f["sigma"], s1, rtol=1e-4, atol=1e-6 * np.abs(s1).max())


def test_native_command_statistics_equal_pytorch_fid(weights, pfid_model, folders, tmp_path, monkeypatch, capsys):
    """Native protocol, mixed sizes: what the command hands the distance equals pytorch-fid's statistics
    (pytorch-fid itself runs mixed sizes one image at a time)."""
    dir_a, files_a, dir_b, files_b = folders
    rec = _Recorder()
    monkeypatch.setattr(fidmod, "frechet_distance", rec)
    out = tmp_path / "a.npz"
    assert fidmod.main([str(dir_a), str(dir_b), "--protocol", "native", "--weights", str(weights),
                        "--batch-size", "4", "--save-stats", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert stdout.strip().splitlines()[-1].startswith("fid ") and _last_number(stdout) == 1.25
    mu1, s1, mu2, s2 = rec.calls[0]
    model = pfid_model
    for (mu, s), files in (((mu1, s1), files_a), ((mu2, s2), files_b)):
        pmu, ps = _pfid_stats(model, files, "native", tmp_path / "x")
        np.testing.assert_allclose(mu, pmu, rtol=1e-5, atol=1e-6 * np.abs(pmu).max())
        np.testing.assert_allclose(s, ps, rtol=1e-4, atol=1e-6 * np.abs(ps).max())
    # .npz round trip: the saved statistics in place of the folder reach the distance unchanged
    assert fidmod.main([str(out), str(dir_b), "--protocol", "native", "--weights", str(weights)]) == 0
    np.testing.assert_array_equal(rec.calls[1][0], mu1)
    np.testing.assert_array_equal(rec.calls[1][1], s1)
    assert fidmod.main([str(out), str(out)]) == 0  # two .npz: no weights needed
    np.testing.assert_array_equal(rec.calls[2][2], mu1)


def _frames(n: int, seed: int, size: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 1, 1, 3))
    return np.clip(base + rng.normal(0, 50, (n, size, size, 3)), 0, 255).astype(np.uint8)


def test_story_fid_streaming_equals_one_pass_and_keys(inception, monkeypatch):
    monkeypatch.setattr(fidmod, "frechet_distance", _Recorder())
    model = inception
    gen, real = _frames(4, 3), _frames(4, 4)  # few frames: Inception at 299 px on CPU is the cost
    values = {}
    for protocol, key in (("fid64", "fid64"), ("native", "fid")):
        one = StoryFID(protocol, inception=model)
        assert isinstance(one, StoryMetric)
        one.update(gen, real, labels=None, captions=None)
        streamed = StoryFID(protocol, inception=model)
        for lo, hi in ((0, 1), (1, 3), (3, 4)):  # uneven parts, one of a single frame
            streamed.update(torch.from_numpy(gen[lo:hi]), torch.from_numpy(real[lo:hi]))
        a, b = one.compute(), streamed.compute()
        assert list(a) == [key] and list(b) == [key]
        for side in ("fake", "real"):
            for x, y in zip(one.stats(side), streamed.stats(side)):
                np.testing.assert_allclose(y, x, rtol=1e-9, atol=1e-12)
        values[key] = one.stats("fake")[0]
        # the Inception network is not in the metric's state (never in a checkpoint)
        assert not any("inception" in k or "blocks" in k for k in one.state_dict())
        one.reset()
        with pytest.raises(RuntimeError, match="at least 2"):
            one.compute()
    assert not np.allclose(values["fid64"], values["fid"], rtol=1e-3)  # the protocols differ


def test_story_fid_matches_pytorch_fid_stats_and_reference(inception, pfid_model, tmp_path, monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(fidmod, "frechet_distance", rec)
    model = inception
    gen, real = _frames(6, 5), _frames(6, 6)  # few frames: Inception at 299 px on CPU is the cost
    m = StoryFID("fid64", inception=model)
    m.update(gen, real)
    # pytorch-fid's own statistics of the same frames (PIL 64x64 done here), through its network and np.cov
    ref = pfid_model
    small = lambda fr: np.stack([np.asarray(Image.fromarray(f).resize((64, 64), Image.BILINEAR)) for f in fr])
    with torch.no_grad():
        feats = [ref(torch.from_numpy(small(fr)).permute(0, 3, 1, 2).float() / 255)[0].flatten(1).double().numpy()
                 for fr in (gen, real)]
    mu_g, mu_r = feats[0].mean(0), feats[1].mean(0)
    s_g, s_r = np.cov(feats[0], rowvar=False), np.cov(feats[1], rowvar=False)
    assert m.compute() == {"fid64": 1.25}
    for got, want in zip(rec.calls[0], (mu_g, s_g, mu_r, s_r)):  # what reaches pytorch-fid's distance
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    # fixed reference statistics from an .npz
    fidmod.save_stats(tmp_path / "ref.npz", mu_r, s_r)
    m2 = StoryFID("fid64", inception=model, reference=tmp_path / "ref.npz")
    m2.update(gen)
    m2.compute()
    np.testing.assert_array_equal(rec.calls[1][2], mu_r)
    np.testing.assert_array_equal(rec.calls[1][3], s_r)
    np.testing.assert_allclose(rec.calls[1][1], rec.calls[0][1], rtol=1e-12)


def test_fid64_resize_is_pil_bilinear():
    frames = _frames(2, 7, size=48)
    out = fidmod.prepare_frames(frames, "fid64").numpy()
    expected = np.stack([np.asarray(Image.fromarray(f).resize((64, 64), Image.BILINEAR)) for f in frames])
    np.testing.assert_array_equal(out, expected)
    wrong = np.stack([np.asarray(Image.fromarray(f).resize((64, 64), Image.BICUBIC)) for f in frames])
    assert not np.array_equal(out, wrong)
    assert fidmod.prepare_frames(frames, "native").shape == (2, 48, 48, 3)


def test_weights_lookup_order(tmp_path, monkeypatch, weights):
    monkeypatch.delenv(fidmod.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(MissingResourceError) as err:
        fidmod.find_weights(None, tmp_path / "wd")
    msg = str(err.value)
    assert "\n" not in msg and fidmod.FID_WEIGHTS_FILE in msg and FID_WEIGHTS_URL in msg
    assert str(tmp_path / "wd" / "fid") in msg and str(tmp_path / "torch") in msg
    hub = tmp_path / "torch" / "hub" / "checkpoints" / fidmod.FID_WEIGHTS_FILE
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"x")
    assert fidmod.find_weights(None, tmp_path / "wd") == hub
    wd = tmp_path / "wd" / "fid" / fidmod.FID_WEIGHTS_FILE
    wd.parent.mkdir(parents=True)
    wd.write_bytes(b"x")
    assert fidmod.find_weights(None, tmp_path / "wd") == wd
    monkeypatch.setenv(fidmod.WEIGHTS_ENV, str(weights))
    assert fidmod.find_weights(None, tmp_path / "wd") == weights
    assert fidmod.find_weights(wd, tmp_path / "wd") == wd
    with pytest.raises(MissingResourceError, match="not found at"):
        fidmod.find_weights(tmp_path / "nope.pth")


def test_command_user_errors(folders, tmp_path, capsys, monkeypatch):
    """In-process (`fidmod.main`, what `python -m storyexp.metrics.fid` runs; the slow test below runs the real
    command): each user error is one `storyexp: error:` line."""
    dir_a, _, dir_b, _ = folders
    # no weights anywhere: no argument, no $STORYEXP_FID_WEIGHTS, an empty torch hub cache
    monkeypatch.delenv(fidmod.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    capsys.readouterr()
    assert fidmod.main([str(dir_a), str(dir_b), "--protocol", "fid64"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("storyexp: error: ")
    assert fidmod.FID_WEIGHTS_FILE in lines[0] and FID_WEIGHTS_URL in lines[0]
    for args in ([str(tmp_path / "missing"), str(dir_b)], [str(dir_a), str(dir_b), "--protocol", "bogus"],
                 [str(tmp_path), str(dir_b), "--weights", "x.pth"]):
        with pytest.raises(SystemExit) if "bogus" in args else _nullcontext():
            rc = fidmod.main(args)
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("storyexp: error: "), err


def test_frechet_distance_equals_pytorch_fids_and_the_exact_value():
    """The eigendecomposition route gives pytorch-fid's ``calculate_frechet_distance`` (scipy's sqrtm of the
    product) on full-rank and on rank-deficient statistics, and, with fewer samples than dimensions, the exact value:
    tr((S1 S2)^1/2) is then the sum of the singular values of X1 X2^T / sqrt((n1-1)(n2-1)) for the centred samples
    X1, X2 (a small, well-conditioned matrix). Identical statistics give 0."""
    rng = np.random.default_rng(0)
    for n1, n2, dim in ((200, 150, 64), (20, 12, 64), (8, 7, 2048)):  # full rank; rank-deficient; FID-sized
        a = rng.normal(size=(n1, dim))
        b = rng.normal(0.3, 1.2, size=(n2, dim)) @ rng.normal(size=(dim, dim)) * (0.2 if dim == 64 else 0.03)
        mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
        ours = fidmod.frechet_distance(mu1, s1, mu2, s2)
        if dim == 64:
            assert ours == pytest.approx(float(fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)), rel=1e-6)
        if n1 < dim:
            x1, x2 = a - mu1, b - mu2
            trace_sqrt = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
            exact = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
            assert ours == pytest.approx(exact, rel=1e-7), (n1, n2, dim)
        # 0 up to float64 rounding of the traces it cancels (and, when rank-deficient, the square roots of the
        # null space's rounding-level eigenvalues)
        assert fidmod.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6 * 2 * np.trace(s1))
    with pytest.raises(ValueError, match="shape"):
        fidmod.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
