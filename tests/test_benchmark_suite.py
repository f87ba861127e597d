"""task=benchmark benchmark.suite=...: a suite of cases, each composed itself, switches timed on against off
(storyexp/tasks/benchmark_suite.py), and the medium model configs it measures. Structure and arithmetic only: no
test asserts that anything is faster."""

from __future__ import annotations

import json
import re
import statistics

import pytest
import torch

from storyexp.errors import ConfigurationError

from .conftest import CONF, TINY_DEMO, compose_cfg, run_composed

SUITE = """
overrides: [benchmark.device=cpu, benchmark.steps=1, benchmark.warmup=0, benchmark.repeats=2, benchmark.fid_frames=1,
            benchmark.loader_batches=2, "eval.fid.protocols=[fid64]", benchmark.peak_tflops=0.5]
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
                              ("fid_frames", 0, "benchmark.fid_frames"), ("peak_tflops", 0, "benchmark.peak_tflops"),
                              ("peak_tflops", "fast", "benchmark.peak_tflops")):
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
    """The `# params: <module>=<N>M` line of storyexp/conf/model/<model>.yaml, against the built networks (within 15 %)."""
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


# ------------------------------------------------------------------------------------------------ loader headroom


def test_loader_headroom_is_loader_over_training_stories_per_second(suite_run):
    """A case measuring train and loader: loader stories/s / training stories/s of the side the loader ran on, in
    benchmark.json, the cases table and the headline; a train-only case has none."""
    from storyexp.tasks.benchmark_suite import flat_metrics

    report, md = suite_run
    case = next(c for c in report["cases"] if c["name"] == "mega_tiny/skip_unconditional")
    expected = case["model_measures"]["loader_stories_per_s"] / case["sides"]["on"]["train_stories_per_s"]
    assert case["loader_headroom"] == pytest.approx(expected) and case["loader_bound"] == (expected < 1)
    assert case["model_measures"]["loader_workers"] == 0
    base = next(c for c in report["cases"] if c["name"] == "mega_tiny")
    assert "loader_headroom" not in base  # measures train and checkpoint only
    assert "| loader headroom |" in md.splitlines()[md.splitlines().index("## Cases (median / min of the repetitions)")
                                                    + 2]
    cell = f"{expected:.3g}" + (" (loader-bound)" if expected < 1 else "")
    assert f"| {cell} |" in next(line for line in md.splitlines() if line.startswith("| mega_tiny/skip_unconditional "
                                                                                        "(on) |"))
    headline = next(line for line in md.splitlines() if line.startswith("Loader headroom"))
    assert f"lowest {expected:.3g} (mega_tiny/skip_unconditional)" in headline
    assert flat_metrics(report["cases"])["benchmark/mega_tiny/skip_unconditional/loader_headroom"] == \
        pytest.approx(expected)
    assert report["context"]["complete"] and report["context"]["cases_done"] == report["context"]["cases_total"] == 3


def test_peak_memory_own_leaves_out_the_other_side(suite_run):
    report, md = suite_run
    base = next(c for c in report["cases"] if c["name"] == "mega_tiny")["sides"]["base"]
    assert base["peak_memory_own_gb"] == pytest.approx(base["peak_memory_gb"])  # nothing else resident
    for side in next(c for c in report["cases"] if c["name"] == "mega_tiny/skip_unconditional")["sides"].values():
        assert 0 <= side["peak_memory_own_gb"] <= side["peak_memory_gb"]
    assert "| peak GB own |" in md


def _row(name: str, loader: float, train: float, switch: str | None = None) -> dict:
    side = "on" if switch else "base"
    stats = {"values": [1 / train], "median": 1 / train, "min": 1 / train}
    return {"name": name, "model": "m", "measure": ["train", "loader"], "switch": switch, "status": "ok",
            "reason": None, "repeats": 1, "batch_size": 1, "loader_headroom": loader / train,
            "loader_bound": loader < train,
            "model_measures": {"loader_stories_per_s": loader,
                               "loader_s_per_story": {"values": [1 / loader], "median": 1 / loader, "min": 1 / loader}},
            "sides": {side: {"train_s_per_story": stats, "train_stories_per_s": train, "peak_memory_gb": 1.0,
                             "peak_memory_added_gb": 0.5, "peak_memory_own_gb": 1.0}}}


def test_a_loader_bound_case_is_flagged():
    """The table and the headline on a stubbed report: headroom < 1 is "loader-bound"."""
    from storyexp.tasks.benchmark_suite import headroom_line, loader_headroom, markdown

    fast, slow = _row("fast_loader", loader=30.0, train=10.0), _row("slow_loader", loader=4.0, train=8.0)
    assert loader_headroom(fast) == pytest.approx(3.0) and loader_headroom(slow) == pytest.approx(0.5)
    context = {"suite": "stub", "date": "today", "device": "cpu", "cpu": "x", "cpu_count": 1, "torch_threads": 1,
               "torch": "t", "seconds": 1.0, "complete": False, "cases_done": 2, "cases_total": 3}
    md = markdown({"context": context, "cases": [fast, slow]})
    assert "| 3 |" in next(line for line in md.splitlines() if line.startswith("| fast_loader |"))
    assert "| 0.5 (loader-bound) |" in next(line for line in md.splitlines() if line.startswith("| slow_loader |"))
    assert headroom_line([fast, slow]) == ("Loader headroom (loader stories/s / training stories/s; < 1: loader-bound):"
                                           " lowest 0.5 (slow_loader); 1 of 2 cases loader-bound: slow_loader.")
    assert headroom_line([fast]).endswith("the loader keeps up in all 1 cases measured.")
    assert "**Incomplete**: 2 of 3 cases" in md
    assert headroom_line([{"name": "a", "status": "skipped"}]) == ""


def test_the_report_is_written_after_every_case(tmp_path, monkeypatch):
    """A suite stopped after its first case (a time limit) leaves benchmark.json / .md with that case."""
    from storyexp.tasks import benchmark_suite

    (tmp_path / "s.yaml").write_text("overrides: [benchmark.device=cpu]\ncases:\n"
                                     "  - {name: first, model: mega_tiny}\n  - {name: second, model: mega_tiny}\n")
    cfg = compose_cfg(["task=benchmark", "model=mega_tiny", f"benchmark.suite={tmp_path / 's.yaml'}"], tmp_path)

    def run_case(parent, suite, case, device):
        if case["name"] == "second":
            raise KeyboardInterrupt  # what a stopped run looks like from here
        return {**_row("first", loader=5.0, train=1.0), "seconds": 0.1}

    monkeypatch.setattr(benchmark_suite, "run_case", run_case)
    with pytest.raises(KeyboardInterrupt):
        benchmark_suite.run(cfg)
    report = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    assert [c["name"] for c in report["cases"]] == ["first"]
    assert report["context"]["complete"] is False and report["context"]["cases_total"] == 2
    assert "**Incomplete**: 1 of 2" in (tmp_path / "out" / "benchmark.md").read_text()


def test_the_suite_device_comes_from_the_suite_and_the_command_line(tmp_path):
    from storyexp.tasks.benchmark_suite import suite_device

    suite = {"overrides": ["data=demo", "benchmark.device=cuda"]}
    assert suite_device(compose_cfg(["task=benchmark"], tmp_path), suite) == "cuda"
    assert suite_device(compose_cfg(["task=benchmark", "benchmark.device=cpu"], tmp_path), suite) == "cpu"
    assert suite_device(compose_cfg(["task=benchmark"], tmp_path), {"overrides": []}) == "auto"


def test_a_side_applies_activation_checkpointing(tmp_path, shared_data_dir, suite_run):
    """The suite's activation_checkpointing case measures something: the side wraps the model's blocks (as
    build_trainer does for a fit) and still trains; without it nothing is wrapped (the suite run's cases)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from storyexp.tasks.benchmark_suite import Side, compose_case

    report, _ = suite_run
    for case in (c for c in report["cases"] if c["status"] == "ok"):
        assert set(case["checkpointed_blocks"].values()) == {0} and set(case["built_on"].values()) == {"cpu"}
    parent = compose_cfg(["task=benchmark", "model=arldm_tiny"], tmp_path, data_dir=shared_data_dir)
    cfg = compose_case(parent, TINY_DEMO + ["model=arldm_tiny", "benchmark.warmup=0", "benchmark.steps=1",
                                            "data.batch_size=2", "activation_checkpointing=true"], tmp_path / "on")
    side = Side(cfg, torch.device("cpu"))
    wrapped = sum(isinstance(m, CheckpointWrapper) for m in side.model.modules())
    assert side.checkpointed == wrapped > 0 and side.built_on == "cpu"
    assert side.train_s_per_story() > 0 and side.resident_gb() > 0


def test_training_flops_and_mfu(suite_run):
    """Every timed training side reports the FLOPs of a step, the achieved TFLOP/s of its median step and, with the
    chip's peak given (benchmark.peak_tflops=0.5 in the suite), the MFU; the table shows them."""
    report, md = suite_run
    for case in (c for c in report["cases"] if c["status"] == "ok" and "train" in c["measure"]):
        for row in case["sides"].values():
            assert row["train_tflop_per_story"] > 0
            assert row["train_tflops"] == pytest.approx(row["train_tflop_per_story"] /
                                                        row["train_s_per_story"]["median"])
            assert row["mfu"] == pytest.approx(row["train_tflops"] / 0.5)
    assert "train TFLOP/s (MFU)" in md and " %)" in md


def test_training_step_flops_are_the_step_s_matmul_flops():
    """Two linear layers, batch B: forward 2B(IH + HO); backward the weight gradients of both (2BIH + 2BHO) and the
    input gradient of the second (2BHO), the first layer's input needing none: the count FlopCounterMode gives."""
    from storyexp.tasks.benchmark import training_step_flops

    B, I, H, O = 3, 5, 7, 2

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(I, H, bias=False), torch.nn.Linear(H, O, bias=False))

        def training_step(self, batch, index):
            return self.net(batch["x"]).square().mean()

    model = Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    flops = training_step_flops(model, optimizer, {"x": torch.randn(B, I)}, 0, torch.device("cpu"),
                                torch.autocast("cpu", enabled=False))
    assert flops == 2 * B * (I * H + H * O) + 2 * B * (I * H + H * O) + 2 * B * H * O


def test_peak_tflops_by_chip_name(monkeypatch):
    from storyexp.tasks import benchmark

    assert benchmark.peak_tflops(torch.device("cpu")) is None
    assert benchmark.peak_tflops(torch.device("cpu"), 100) == 100.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert benchmark.peak_tflops(torch.device("cuda")) == 989.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert benchmark.peak_tflops(torch.device("cuda")) is None


@pytest.mark.slow  # ~12 s of Hydra composition; test_cpu_suite_composes_every_case composes one case by default
def test_every_cpu_suite_case_composes_on_both_sides(tmp_path):
    """The shipped CPU suite has no case that would be reported skipped: every side of every case composes and
    passes the config checks, and a switch's sides differ."""
    from storyexp.tasks.benchmark_suite import compose_case, load_suite

    suite = load_suite("cpu")
    parent = compose_cfg(["task=benchmark", "benchmark.suite=cpu"], tmp_path)
    for case in suite["cases"]:
        sides = {"on": case["switch"]["on"], "off": case["switch"]["off"]} if case["switch"] else {"base": []}
        if case["switch"]:
            assert sides["on"] != sides["off"], case["name"]
        for side, extra in sides.items():
            cfg = compose_case(parent, [f"model={case['model']}"] + suite["overrides"] + case["overrides"] + extra,
                               tmp_path / case["name"].replace("/", "_") / side)
            assert cfg.benchmark.device == "cpu", case["name"]
