"""task=benchmark benchmark.suite=...: a suite of cases, each composed itself, switches timed on against off
(storyexp/tasks/benchmark_suite.py), and the medium model configs it measures. Structure and arithmetic only: no
test asserts that anything is faster."""

from __future__ import annotations

import json
import re
import statistics

import pytest

from storyexp.errors import ConfigurationError

from .conftest import CONF, TINY_DEMO, compose_cfg, run_composed

SUITE = """
overrides: [benchmark.device=cpu, benchmark.steps=1, benchmark.warmup=0, benchmark.repeats=2, benchmark.fid_frames=1,
            benchmark.loader_batches=2, "eval.fid.protocols=[fid64]"]
cases:
  - {name: mega_tiny, model: mega_tiny, measure: [train, checkpoint]}
  - name: mega_tiny/skip_unconditional
    model: mega_tiny
    measure: [train, sample, loader, fid]
    switch: {name: skip_unconditional, with: [model.sampler.skip_unconditional=true],
             without: [model.sampler.skip_unconditional=false]}
  - name: mega_tiny/not_a_switch
    model: mega_tiny
    switch: {name: not_a_switch, with: [model.network.not_a_switch=true], without: [model.network.not_a_switch=false]}
"""


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory, shared_data_dir):
    tmp = tmp_path_factory.mktemp("suite")
    (tmp / "tiny_suite.yaml").write_text(SUITE)
    overrides = TINY_DEMO + ["data.batch_size=2", "model=mega_tiny", "task=benchmark",
                             f"benchmark.suite={tmp / 'tiny_suite.yaml'}", "print_config=false"]
    _, out = run_composed(overrides, tmp, shared_data_dir)
    return json.loads((out / "benchmark.json").read_text()), (out / "benchmark.md").read_text()


def test_suite_writes_every_measure(suite_run):
    report, _ = suite_run
    assert report["context"]["device"] == "cpu" and report["context"]["cpu_count"] >= 1
    assert "benchmark.suite=" in report["context"]["command"]
    base = next(c for c in report["cases"] if c["name"] == "mega_tiny")
    switch = next(c for c in report["cases"] if c["name"] == "mega_tiny/skip_unconditional")
    assert base["status"] == "ok" and base["repeats"] == 2 and base["batch_size"] == 2
    assert set(base["sides"]) == {"base"}
    rows = [(base["sides"]["base"], ("train_s_per_story",))] + [(switch["sides"][side], ("train_s_per_story",
                                                                                       "sample_s_per_story"))
                                                               for side in ("on", "off")]
    for row, keys in rows:
        for key in keys:
            assert len(row[key]["values"]) == 2 and all(v > 0 for v in row[key]["values"])
            assert row[key]["median"] == pytest.approx(statistics.median(row[key]["values"]))
            assert row[key]["min"] == min(row[key]["values"])
        assert row["train_stories_per_s"] == pytest.approx(1 / row["train_s_per_story"]["median"])
        assert row["peak_memory_gb"] > 0 and 0 <= row["peak_memory_added_gb"] <= row["peak_memory_gb"]
    assert "sample_s_per_story" not in base["sides"]["base"]  # only what the case asks for
    once = switch["model_measures"]  # measured on the `on` side
    assert once["loader_stories_per_s"] == pytest.approx(1 / once["loader_s_per_story"]["median"])
    assert once["fid_frames_per_s"] == pytest.approx(1 / once["fid_s_per_frame"]["median"])
    assert once["fid_frames"] == 1 and once["fid_protocols"] == ["fid64"]
    assert once["fid_weights"].startswith("random values")  # the tests hold no FID weights file
    ckpt = base["model_measures"]
    # the lean checkpoint leaves out the frozen VQGAN: fewer bytes than every tensor, and the bytes of what trains
    assert ckpt["checkpoint_lean"] and 0 < ckpt["checkpoint_mb"] < ckpt["checkpoint_full_mb"]
    assert ckpt["checkpoint_mb"] >= ckpt["params_trainable"] * 4 / 1024**2
    assert 0 < ckpt["params_trainable"] < ckpt["params_total"]


def test_switch_ratio_is_on_over_off_of_the_medians(suite_run):
    report, md = suite_run
    case = next(c for c in report["cases"] if c["name"] == "mega_tiny/skip_unconditional")
    assert case["status"] == "ok" and set(case["sides"]) == {"on", "off"}
    assert case["overrides"]["on"][-1] == "model.sampler.skip_unconditional=true"
    assert case["overrides"]["off"][-1] == "model.sampler.skip_unconditional=false"
    for key in ("train_s_per_story", "sample_s_per_story"):
        on, off = case["sides"]["on"][key]["median"], case["sides"]["off"][key]["median"]
        assert case["ratio"][key] == pytest.approx(on / off)
        assert case["speedup"][key] == pytest.approx(off / on)
        assert f"| {case['ratio'][key]:.3f} | {case['speedup'][key]:.2f}x |" in md
    assert "## Switches" in md and "| mega_tiny (base) |" not in md and "| mega_tiny | mega_tiny | 2 | 2 |" in md


def test_a_case_that_does_not_compose_is_skipped(suite_run):
    report, md = suite_run
    case = next(c for c in report["cases"] if c["name"] == "mega_tiny/not_a_switch")
    assert case["status"] == "skipped" and "sides" not in case
    assert "does not compose" in case["reason"] and "model.network.not_a_switch" in case["reason"]
    assert "## Skipped" in md and "| mega_tiny/not_a_switch | mega_tiny | does not compose" in md


@pytest.mark.parametrize("text, match", [
    ("cases: []", "non-empty `cases:`"),
    ("cases: [{name: a, model: mega_tiny, measure: [speed]}]", "measure must be"),
    ("cases: [{name: a, model: mega_tiny, switch: {name: s, on: [x=1], off: [x=2]}}]", "name, with, without"),
    ("cases: [{name: a, model: mega_tiny}, {name: a, model: mega_tiny}]", "used twice"),
])
def test_bad_suite_files_are_one_line_errors(tmp_path, text, match):
    from storyexp.tasks.benchmark_suite import load_suite

    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(ConfigurationError, match=match):
        load_suite(str(tmp_path / "s.yaml"))


def test_suite_options_are_checked(tmp_path):
    from omegaconf import open_dict

    from storyexp.tasks.validate import validate_config

    cfg = compose_cfg(["task=benchmark", "model=mega_tiny"], tmp_path)
    for key, value, match in (("suite", "no_such_suite", "Known suites: cpu"), ("repeats", 0, "benchmark.repeats"),
                              ("fid_frames", 0, "benchmark.fid_frames")):
        bad = cfg.copy()
        with open_dict(bad):
            bad.benchmark[key] = value
        with pytest.raises(ConfigurationError, match=match):
            validate_config(bad)


def test_cpu_suite_composes_every_case(tmp_path):
    """The shipped suite: every model size and every switch (fused_attention included) is in it, and a case's config
    is composed from the suite's overrides, its own and its switch's."""
    from storyexp.tasks.benchmark_suite import compose_case, load_suite

    suite = load_suite("cpu")
    parent = compose_cfg(["task=benchmark", "benchmark.suite=cpu", "model=mega_tiny"], tmp_path)
    models = {c["model"] for c in suite["cases"]}
    assert {f"{m}_{s}" for m in ("mindalle", "mega", "arldm") for s in ("tiny", "demo", "medium")} <= models
    switches = {c["switch"]["name"] for c in suite["cases"] if c["switch"]}
    assert {"skip_unconditional", "fused_attention", "data.precompute"} <= switches
    case = next(c for c in suite["cases"] if c["name"] == "mega_demo/precompute")
    cfg = compose_case(parent, [f"model={case['model']}"] + suite["overrides"] + case["overrides"]
                       + case["switch"]["on"], tmp_path / "case")
    assert cfg.data.precompute is True and cfg.model.network.stage1_fit is None and cfg.benchmark.repeats == 3
    assert cfg.paths.output_dir == str(tmp_path / "case") and cfg.data.batch_size == 2


@pytest.mark.parametrize("model, family", [("mindalle_medium", "mindalle"), ("mega_medium", "mega"),
                                           ("arldm_medium", "arldm")])
def test_medium_configs_have_their_stated_sizes(tmp_path, model, family):
    """The `# params: <module>=<N>M` line of conf/model/<model>.yaml, against the built networks (within 15 %)."""
    import torch

    from storyexp.tasks.common import build_model

    text = (CONF / "model" / f"{model}.yaml").read_text()
    assert re.search(rf"^  - {family}(_tiny)?$", text, re.M)  # inherits from its family
    targets = dict(re.findall(r"(\S+)=([\d.]+)M", re.search(r"^# params: (.*)$", text, re.M).group(1)))
    cfg = compose_cfg(TINY_DEMO + [f"model={model}"], tmp_path)
    with torch.device("meta"):  # sizes only: no memory, no initialisation time
        system = build_model(cfg)
    for path, millions in targets.items():
        count = sum(p.numel() for p in system.get_submodule(path).parameters())
        assert count == pytest.approx(float(millions) * 1e6, rel=0.15), (path, count)
