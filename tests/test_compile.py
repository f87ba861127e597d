"""`compile=true`: every declared block compiled in place by `torch.compile` (strategies.apply_compile), through the
same path as activation checkpointing; checkpoints keep their keys and the outputs stay the same. The compiled runs
themselves are slow on a CPU (tens of seconds of compilation per model): `-m slow`."""

from __future__ import annotations

import pytest
import torch

from storyexp.errors import ConfigurationError
from storyexp.tasks.common import build_trainer
from storyexp.tasks.strategies import apply_compile, block_modules
from storyexp.tasks.validate import validate_config

from .conftest import TINY_DEMO, compose_cfg
from .test_strategies import build, loss_and_grads


def compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def test_compile_switch_compiles_every_block_through_the_trainer_set_up(tmp_path):
    cfg, model = build(tmp_path, "mega_tiny", "trainer=cpu", "compile=true", "activation_checkpointing=true",
                       "logger=csv")
    validate_config(cfg)
    keys = list(model.state_dict())
    build_trainer(cfg, [], [], model)
    blocks = block_modules(model)
    assert blocks and all(compiled(b) for b in blocks)
    assert list(model.state_dict()) == keys  # nothing renamed: checkpoints move between compiled and eager runs
    cfg_off, model_off = build(tmp_path, "mega_tiny", "trainer=cpu", "logger=csv")
    assert cfg_off.compile is False
    build_trainer(cfg_off, [], [], model_off)
    assert not any(compiled(b) for b in block_modules(model_off))


@pytest.mark.parametrize("overrides, message", [
    (["compile=yes"], "compile='yes' is not valid: it must be true or false."),
    (["compile=true", "trainer=fsdp"], "compile=true is not supported with trainer=fsdp"),
    (["compile=true", "trainer=deepspeed"], "compile=true is not supported with trainer=deepspeed"),
])
def test_compile_nonsense_is_refused_in_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigurationError) as err:
        validate_config(compose_cfg(TINY_DEMO + ["model=mega_tiny", *overrides], tmp_path))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_compiled_blocks_keep_codes_losses_and_gradients(tmp_path, demo_train_batch):
    """mindalle_tiny: the same sampled codes; arldm_tiny: the same loss and gradients (float tolerance)."""
    _, model = build(tmp_path, "mindalle_tiny")
    eager = model.generate(demo_train_batch)
    apply_compile(model)
    assert torch.equal(model.generate(demo_train_batch), eager)

    _, model = build(tmp_path, "arldm_tiny")
    model.train()
    loss, grads = loss_and_grads(model, demo_train_batch)
    apply_compile(model)
    loss_c, grads_c = loss_and_grads(model, demo_train_batch)
    torch.testing.assert_close(loss_c, loss, rtol=1e-4, atol=1e-5)
    assert grads.keys() == grads_c.keys()
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-3, atol=1e-5, msg=name)
