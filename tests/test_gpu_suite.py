"""GPU settings that compose on any machine: the top-level `float32_matmul_precision`, and the GPU benchmark suite
(storyexp/conf/benchmark_suite/gpu.yaml + benchmarks/gpu_check.sh), checked for composition here; it runs on a GPU only."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from storyexp.errors import ConfigurationError

from .conftest import CONF, REPO, compose_cfg

# ------------------------------------------------------------------------------------- float32_matmul_precision


@pytest.fixture
def restore_matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def test_float32_matmul_precision_defaults_to_highest(tmp_path):
    assert compose_cfg([], tmp_path).float32_matmul_precision == "highest"


@pytest.mark.parametrize("value", ["highest", "high", "medium"])
def test_float32_matmul_precision_is_set_at_task_start(tmp_path, restore_matmul_precision, value):
    """Every task builds its data module first (`build_datamodule`, inside `build_data_and_model` too): that sets it."""
    from storyexp.tasks.common import build_datamodule
    from storyexp.tasks.validate import validate_config

    cfg = compose_cfg([f"float32_matmul_precision={value}"], tmp_path)
    validate_config(cfg)
    other = "medium" if value != "medium" else "highest"
    torch.set_float32_matmul_precision(other)
    build_datamodule(cfg)
    assert torch.get_float32_matmul_precision() == value


@pytest.mark.parametrize("value", ["tf32", "HIGH", 1])
def test_a_bad_float32_matmul_precision_is_one_line_naming_the_key(tmp_path, restore_matmul_precision, value):
    from storyexp.tasks.common import apply_float32_matmul_precision
    from storyexp.tasks.validate import validate_config

    cfg = compose_cfg([], tmp_path)
    with open_dict(cfg):
        cfg.float32_matmul_precision = value
    torch.set_float32_matmul_precision("medium")
    for check in (validate_config, apply_float32_matmul_precision):
        with pytest.raises(ConfigurationError, match=r"^float32_matmul_precision=.* is not valid: .*highest, high, "
                                                     r"medium") as err:
            check(cfg)
        assert "\n" not in str(err.value)
    assert torch.get_float32_matmul_precision() == "medium"  # a refused value sets nothing


# ------------------------------------------------------------------------------------------------ the GPU suite



def _suite():
    from storyexp.tasks.benchmark_suite import load_suite

    return load_suite("gpu")


def _case_names() -> list[str]:
    return [c["name"] for c in _suite()["cases"]]


def test_gpu_suite_covers_the_switches_at_published_size():
    suite = _suite()
    assert {c["model"] for c in suite["cases"]} == {"mindalle_scale", "mega_scale", "arldm_scale"}
    for setting in ("benchmark.device=cuda", "trainer.precision=bf16-mixed", "benchmark.steps=2", "benchmark.warmup=1",
                    "benchmark.repeats=2", "data.batch_size=1"):
        assert setting in suite["overrides"], setting
    switches = {(c["model"], c["switch"]["name"]) for c in suite["cases"]}
    assert all(c["switch"] for c in suite["cases"])
    assert {("mindalle_scale", "fused_attention"), ("mega_scale", "fused_attention"),
            ("mega_scale", "skip_unconditional"), ("mindalle_scale", "data.precompute"),
            ("mega_scale", "data.precompute"), ("arldm_scale", "data.precompute"),
            ("arldm_scale", "float32_matmul_precision"), ("arldm_scale", "trainer.precision"),
            ("arldm_scale", "activation_checkpointing"), ("mindalle_scale", "static_cache"),
            ("arldm_scale", "channels_last")} <= switches
    measures = {(c["model"], c["switch"]["name"]): set(c["measure"]) for c in suite["cases"]}
    assert {"train", "sample"} <= measures[("mindalle_scale", "fused_attention")]
    assert {"train", "sample"} <= measures[("mega_scale", "fused_attention")]
    assert measures[("mega_scale", "skip_unconditional")] == {"sample"}
    assert measures[("arldm_scale", "activation_checkpointing")] == {"train"}
    assert any("loader" in m for m in measures.values())  # loader headroom is reported


# slow (about 12 s of Hydra composition for all cases): the GPU suite's coverage of every switch at published size is
# checked by the default test_gpu_suite_covers_the_switches_at_published_size
@pytest.mark.slow
@pytest.mark.parametrize("name", _case_names())
def test_every_gpu_case_composes_and_its_sides_differ(tmp_path, name):
    from storyexp.tasks.benchmark_suite import compose_case

    suite = _suite()
    case = next(c for c in suite["cases"] if c["name"] == name)
    switch = case["switch"]
    assert switch["on"] and switch["off"] and switch["on"] != switch["off"]
    parent = compose_cfg(["task=benchmark", "benchmark.suite=gpu"], tmp_path)
    cfgs = {}
    for side in ("on", "off"):
        overrides = [f"model={case['model']}"] + suite["overrides"] + case["overrides"] + switch[side]
        cfgs[side] = compose_case(parent, overrides, tmp_path / side)  # raises CaseSkipped if it does not compose
    on, off = (OmegaConf.to_container(cfgs[s], resolve=True) for s in ("on", "off"))
    assert on != off
    for side, cfg in cfgs.items():
        assert cfg.benchmark.device == "cuda" and cfg.data.batch_size == 1 and cfg.benchmark.repeats == 2
        for override in switch[side]:  # the switch's own value is what the side composes
            key, value = override.split("=", 1)
            assert str(OmegaConf.select(cfg, key)).lower() == value.lower(), (side, key)
    if switch["name"] == "activation_checkpointing":
        assert cfgs["on"].model.image_size == 512 and cfgs["on"].trainer.precision == "bf16-mixed"
    if switch["name"] == "float32_matmul_precision":
        assert cfgs["on"].trainer.precision == "32-true" == cfgs["off"].trainer.precision


def test_gpu_check_script_is_valid_bash():
    script = REPO / "benchmarks" / "gpu_check.sh"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash")
    for part in ("timeout 540", "nvidia-smi", "benchmark.suite=gpu", "benchmark.json", "benchmark.md", "${OUT:-}"):
        assert part in text, part
    bash = shutil.which("bash")
    assert bash, "bash is needed to check benchmarks/gpu_check.sh"
    done = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    usage = subprocess.run([bash, str(script)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert usage.returncode == 2 and "usage" in usage.stderr  # no OUT_DIR, no $OUT: a usage line, nothing run


def test_suite_files_are_listed():
    assert {"cpu", "gpu"} <= {p.stem for p in (CONF / "benchmark_suite").glob("*.yaml")}
