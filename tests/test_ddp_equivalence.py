"""DDP equals one process: the same global batch and seed give the same loss and the same updated weights on 2 gloo
processes (trainer=ddp_cpu) as on 1 (trainer=cpu), for each of the three models at tiny size.

Equality holds because every random draw of a training step comes from the story's own generator
(`StorySystem.training_generators`), the global batch is split evenly, and DDP averages the gradients of equal-sized
shards: the mean of the shards' mean losses is the global batch's mean loss. The tolerance is float32 summation order
(gradients are summed in another order across processes) amplified by one Adam step.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.conftest import run_forked
from tests.ddp_one_step import MODEL_OVERRIDES, one_step

MODELS = list(MODEL_OVERRIDES)


def _forked_rank(rank: int, out: str, data_dir: str, port: int) -> None:
    """One of the 2 processes, as torchrun would start it: the elastic environment's variables, so Lightning
    (TorchElasticEnvironment) joins the process group instead of re-launching, then tests/ddp_one_step.py's main."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "TORCHELASTIC_RUN_ID": "storyexp-test"})
    from tests.ddp_one_step import main

    main(out, data_dir, *MODELS)


@pytest.fixture(scope="module")
def two_process_steps(tmp_path_factory, shared_data_dir) -> tuple[Path, dict[str, dict]]:
    """The step of every model on 2 processes (one pair of processes for all three), and on 1 in this process.

    The pair is forked from this process (conftest.run_forked), not started by torchrun:
    torchrun's launcher and two fresh interpreters import torch and Lightning again (~10 s on 2 cores). CPU only,
    one torch thread, no logger threads: what fork needs. `python -m torch.distributed.run --nproc_per_node=2
    tests/ddp_one_step.py ...` runs the same steps from a shell."""
    import socket

    out = tmp_path_factory.mktemp("ddp_steps")
    single = {m: one_step(m, "cpu", out / "single", shared_data_dir) for m in MODELS}  # also builds the demo data
    with socket.socket() as free:  # a free port on 127.0.0.1 for the process group (torchrun --standalone's way)
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    # the children set the elastic variables in their own copy of the environment; this process's is untouched
    run_forked(_forked_rank, (str(out), str(shared_data_dir), port))
    double = {m: torch.load(out / f"{m}.pt", weights_only=False) for m in MODELS}
    return single, double


@pytest.mark.parametrize("model", MODELS)
def test_one_ddp_step_equals_one_process(two_process_steps, model):
    single, double = (steps[model] for steps in two_process_steps)
    assert single["world_size"] == 1 and double["world_size"] == 2
    assert double["ids"] == single["ids"] and len(single["ids"]) == 4  # the same global batch of 4 stories
    assert double["loss"] == pytest.approx(single["loss"], rel=1e-5, abs=1e-6)
    assert double["state"].keys() == single["state"].keys()
    for name, value in single["state"].items():
        other = double["state"][name]
        if value.is_floating_point():
            torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{model} {name}: {m}")
        else:
            assert torch.equal(other, value), name
    # both started from the same weights, and the step moved them (an untrained comparison would pass trivially)
    assert all(torch.equal(double["initial"][n], v) for n, v in single["initial"].items())
    moved = [n for n, v in single["state"].items() if v.is_floating_point() and not torch.equal(single["initial"][n], v)]
    assert len(moved) > len(single["state"]) // 4, moved
