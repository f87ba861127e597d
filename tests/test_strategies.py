"""Full finetunes: activation checkpointing on the tiny models (same loss and gradients, blocks really recomputed),
the per-model blocks that FSDP wraps, the trainer=fsdp / trainer=deepspeed strategy objects, the one-line refusals,
and sharded checkpoint folders in the tasks' resume paths.

What cannot run here (no GPU): Lightning refuses FSDPStrategy unless accelerator is cuda/gpu
(accelerator_connector._check_strategy_and_fallback), and torch's FullyShardedDataParallel itself raises "FSDP needs
a non-CPU accelerator device" (torch/distributed/fsdp/_init_utils.py, _init_device_handle); Lightning's
DeepSpeedStrategy.setup_environment raises "The DeepSpeed strategy is only supported on CUDA GPUs". Those runs,
with sharded save + resume, are in benchmarks/gpu_check_scale.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from storyexp.errors import ConfigurationError
from storyexp.tasks import sharded
from storyexp.tasks.common import build_trainer, newest_checkpoint, read_checkpoint, require_file, resolve_ckpt_path
from storyexp.tasks.strategies import (
    AutocastDeepSpeedPrecision,
    apply_activation_checkpointing,
    block_modules,
    fsdp_wrap_policy,
    scale_model,
    sharding_units,
)
from storyexp.tasks.validate import validate_config

from .conftest import TINY_DEMO, compose_cfg

REPO = Path(__file__).resolve().parents[1]
MODELS = ("mindalle_tiny", "mega_tiny", "arldm_tiny")


def block_classes(name: str) -> set[str]:
    return {
        "mindalle_tiny": {"CausalSelfAttention", "Sequential", "CrossAttentionLayer", "Block"},
        "mega_tiny": {"EncoderLayer", "DecoderLayer"},
        "arldm_tiny": {"CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn", "UpBlock2D",
                       "CrossAttnUpBlock2D", "CLIPEncoderLayer", "BlipEncoderLayer", "BlipTextLayer"},
    }[name]


def build(tmp_path: Path, model: str, *overrides: str, data_dir: Path | None = None):
    cfg = compose_cfg(TINY_DEMO + [f"model={model}", *overrides], tmp_path, data_dir=data_dir)
    return cfg, hydra.utils.instantiate(cfg.model, _convert_="all")


@pytest.fixture(scope="module")
def demo_batch(demo_train_batch):
    return demo_train_batch


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model.losses(batch, model.training_generators(batch))["loss"]
    loss.backward()
    strip = lambda name: name.replace("._checkpoint_wrapped_module", "")  # noqa: E731
    return loss.detach(), {strip(n): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------ activation checkpointing


@pytest.mark.parametrize("name", MODELS)
def test_activation_checkpointing_keeps_loss_and_gradients(name, tmp_path, demo_batch):
    _, model = build(tmp_path, name)
    model.train()
    keys = list(model.state_dict())
    loss, grads = loss_and_grads(model, demo_batch)

    calls = []
    first = block_modules(model)[0]
    first.register_forward_pre_hook(lambda *_: calls.append(1))  # (recomputation may stop before the end)
    wrappers = apply_activation_checkpointing(model)
    assert all(isinstance(w, CheckpointWrapper) for w in wrappers)
    assert apply_activation_checkpointing(model) == wrappers  # applying twice wraps nothing twice
    loss_ac, grads_ac = loss_and_grads(model, demo_batch)

    assert torch.equal(loss, loss_ac)
    assert grads.keys() == grads_ac.keys() and all(torch.equal(grads[k], grads_ac[k]) for k in grads)
    assert len(calls) == 2  # forward, then the recomputation in backward: the activations were not kept
    assert list(model.state_dict()) == keys  # checkpoints do not change with the switch


def test_activation_checkpointing_switch_on_a_plain_trainer(tmp_path):
    cfg, model = build(tmp_path, "mega_tiny", "trainer=cpu", "activation_checkpointing=true", "logger=csv")
    validate_config(cfg)
    trainer = build_trainer(cfg, [], [], model)
    assert type(trainer.strategy).__name__ == "SingleDeviceStrategy"
    assert sum(isinstance(m, CheckpointWrapper) for m in model.modules()) == len(block_modules(model))


# ------------------------------------------------------------------------------------------------ wrap policy


@pytest.mark.parametrize("name", MODELS)
def test_fsdp_units_are_the_models_real_blocks(name, tmp_path):
    _, model = build(tmp_path, name)
    blocks = block_modules(model)
    assert {type(b).__name__ for b in blocks} == block_classes(name)
    # the policy FSDP runs selects exactly the declared blocks, and their checkpoint wrappers once wrapped
    chosen = fsdp_wrap_policy(sharding_units(model))._run_policy(model, set(), {})
    assert set(map(id, chosen)) == set(map(id, blocks))
    apply_activation_checkpointing(model)
    chosen = fsdp_wrap_policy(sharding_units(model))._run_policy(model, set(), {})
    assert len(chosen) == len(blocks) and all(isinstance(m, CheckpointWrapper) for m in chosen)
    assert {id(m._checkpoint_wrapped_module) for m in chosen} == set(map(id, blocks))


def test_fsdp_trainer_builds_lightnings_strategy(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import ShardingStrategy

    cfg, model = build(tmp_path, "arldm_tiny", "trainer=fsdp", "trainer.strategy.sharding_strategy=SHARD_GRAD_OP",
                       "activation_checkpointing=true")
    validate_config(cfg)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"
    strategy = scale_model(cfg, model)["strategy"]
    assert type(strategy) is FSDPStrategy and strategy._state_dict_type == "sharded"
    assert strategy.sharding_strategy == ShardingStrategy.SHARD_GRAD_OP and strategy.kwargs["use_orig_params"]
    assert len(strategy.kwargs["auto_wrap_policy"]._run_policy(model, set(), {})) == len(block_modules(model))
    with pytest.raises(ValueError, match="requires a GPU accelerator"):  # Lightning's own refusal on CPU
        import lightning as L

        L.Trainer(accelerator="cpu", strategy=strategy, logger=False)


@pytest.mark.parametrize("overrides, stage, offload", [
    ([], 2, False),
    (["trainer.strategy.stage=3"], 3, False),
    (["trainer.strategy.stage=3", "trainer.strategy.offload_optimizer=true",
      "trainer.strategy.offload_parameters=true"], 3, True),
])
def test_deepspeed_trainer_builds_lightnings_strategy(tmp_path, overrides, stage, offload):
    cfg, model = build(tmp_path, "mindalle_tiny", "trainer=deepspeed", *overrides)
    validate_config(cfg)
    strategy = scale_model(cfg, model)["strategy"]
    zero = strategy.config["zero_optimization"]
    assert type(strategy).__name__ == "DeepSpeedStrategy" and zero["stage"] == stage
    assert ("offload_optimizer" in zero and "offload_param" in zero) == offload
    assert strategy.config["zero_force_ds_cpu_optimizer"] is False  # the systems' torch AdamW on offloaded states
    assert isinstance(strategy.precision_plugin, AutocastDeepSpeedPrecision)
    assert strategy.precision_plugin._desired_dtype == torch.bfloat16


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # the CUDA autocast it builds, on this CPU machine
def test_deepspeed_forward_runs_under_autocast():
    ctx = AutocastDeepSpeedPrecision("bf16-mixed").forward_context()
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    assert not isinstance(AutocastDeepSpeedPrecision("32-true").forward_context(), torch.autocast)


# -------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("overrides, message", [
    (["trainer=deepspeed", "trainer.accelerator=cpu"], "trainer=deepspeed needs trainer.accelerator=gpu"),
    (["trainer=fsdp", "trainer.accelerator=cpu"], "trainer=fsdp needs trainer.accelerator=gpu"),
    (["trainer=deepspeed", "trainer.strategy.stage=0"], "trainer.strategy.stage=0 is not valid"),
    (["trainer=deepspeed", "trainer.strategy.offload_parameters=true"], "offload_parameters=true needs "
                                                                         "trainer.strategy.stage=3"),
    (["trainer=deepspeed", "trainer.precision=bf16-true"], "not valid with trainer=deepspeed"),
    (["trainer=fsdp", "trainer.strategy.sharding_strategy=HALF"], "sharding_strategy='HALF' is not valid"),
    (["trainer=fsdp", "trainer.strategy.state_dict_type=local"], "state_dict_type='local' is not valid"),
    (["trainer=fsdp", "+trainer.strategy.auto_wrap_policy=Block"], "auto_wrap_policy is not an option"),
    (["trainer=gpu", "+trainer.strategy=fsdp"], "use trainer=fsdp"),
    (["trainer=gpu", "+trainer.strategy=deepspeed_stage_3"], "use trainer=deepspeed"),
    (["activation_checkpointing=yes"], "activation_checkpointing='yes' is not valid"),
])
def test_nonsense_is_refused_in_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigurationError) as err:
        validate_config(compose_cfg(TINY_DEMO + ["model=mega_tiny", *overrides], tmp_path))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_multirun_refusal_covers_the_sharded_trainers(tmp_path):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import read_write

    from storyexp.tasks import refuse_multirun_with_subprocess_ddp

    cfg = compose_cfg(["trainer=deepspeed"], tmp_path)
    with read_write(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig().set_config(cfg)
    with pytest.raises(ConfigurationError, match="trainer.strategy=deepspeed on the basic launcher"):
        refuse_multirun_with_subprocess_ddp(cfg)


# --------------------------------------------------------------------------------------- sharded checkpoints


def write_fsdp_layout(folder: Path, metadata: dict) -> None:
    """The folder FSDPStrategy(state_dict_type='sharded') writes: torch.distributed.checkpoint shards of the model
    (and optimizer) state plus meta.pt with the rest, here from one process (DCP runs without a process group)."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": {"w": torch.ones(3)}}, checkpoint_id=str(folder))
    torch.save(metadata, folder / sharded.FSDP_METADATA)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP from one process, as intended
def test_sharded_checkpoint_folders_resume_through_the_tasks(tmp_path):
    from storyexp.callbacks.model_record import RECORD_KEY

    run = tmp_path / "run"
    folder = run / "checkpoints" / "last.ckpt"
    folder.mkdir(parents=True)
    write_fsdp_layout(folder, {"global_step": 4, RECORD_KEY: {"model": "mega_tiny", "config": {}}})

    assert sharded.sharded_kind(folder) == "fsdp" and sharded.sharded_kind(run) is None
    assert require_file(str(folder), "Checkpoint") == str(folder)
    assert read_checkpoint(str(folder))[RECORD_KEY]["model"] == "mega_tiny"
    assert newest_checkpoint(run) == folder
    for given in (str(folder), str(run)):  # the folder itself, or its run directory
        cfg = compose_cfg(TINY_DEMO + ["model=mega_tiny", "trainer=fsdp", f"ckpt_path={given}"], tmp_path)
        resolve_ckpt_path(cfg)
        assert cfg.ckpt_path == str(folder)
    # a plain trainer cannot read it: one line with the fix, before anything runs
    cfg = compose_cfg(TINY_DEMO + ["model=mega_tiny", "trainer=cpu", f"ckpt_path={folder}"], tmp_path)
    with pytest.raises(ConfigurationError, match=r"sharded fsdp checkpoint.*trainer=fsdp.*consolidate_checkpoint"):
        build_trainer(cfg, [], [])


def test_deepspeed_folder_layout_is_recognised(tmp_path):
    folder = tmp_path / "last.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / sharded.DEEPSPEED_LATEST).write_text("checkpoint")
    torch.save({"global_step": 2, "module": {}}, folder / "checkpoint" / "mp_rank_00_model_states.pt")
    assert sharded.sharded_kind(folder) == "deepspeed"
    assert sharded.read_metadata(folder)["global_step"] == 2
    sharded.check_readable_by(folder, "deepspeed")
    with pytest.raises(ConfigurationError, match="convert_zero_checkpoint_to_fp32_state_dict"):
        sharded.check_readable_by(folder, "fsdp")


# ---------------------------------------------------------------------------------------------- GPU check


def test_gpu_check_script_parses_without_a_gpu():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check_scale.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--budget" in out.stdout
