"""storyexp's submitit launchers (`launcher=slurm`, `launcher=submitit_local`): hydra-submitit-launcher's, with a
`checkpoint()` that makes a requeued job resume.

submitit calls the job's `checkpoint()` when the job is pre-empted or reaches its time limit (its handler for USR2;
storyexp's Preemption callback defers that call until the training state is saved) and resubmits what it returns,
up to `max_num_timeout` time-outs. The stock launcher resubmits the job's original overrides, so the requeued job
would train again from step 0 in the same run directory. Here the resubmission adds `ckpt_path=last` when the run
directory holds a checkpoint (any `ckpt_path` of the original command line gives way to it): the job continues from
its newest checkpoint. It is the same run directory: the job keeps its job number, and its config is rebuilt from
the pickled launch config, whose resolver cache (the `${now:...}` of `hydra.sweep.dir` among it) Hydra copies into
every job's config (`ConfigLoaderImpl.load_sweep_config`).

Hydra loads launchers only from the `hydra_plugins` namespace package; this file is found there when `launch.py`'s
folder (the repository) is on `sys.path`, which `python launch.py` ensures. Jobs receive the launcher pickled by
value (`launch`), so they need not import this file wherever they start.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

try:  # the [slurm] extra; without it Hydra's plugin scan must still import this file quietly
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
except ImportError:
    LocalLauncher = SlurmLauncher = None


def resume_overrides(overrides: Sequence[str], run_dir: str | None) -> list[str]:
    """The job's overrides, with `ckpt_path=last` when `run_dir` holds a checkpoint."""
    from storyexp.tasks.common import newest_checkpoint

    if not run_dir or newest_checkpoint(run_dir) is None:
        return list(overrides)
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "ckpt_path"]
    return kept + ["ckpt_path=last"]


class _Resuming:
    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """The resubmission submitit requeues (called in the job, while its task runs: HydraConfig is the job's)."""
        import submitit
        from hydra.core.hydra_config import HydraConfig

        overrides, *rest = args
        run_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None
        return submitit.helpers.DelayedSubmission(self, resume_overrides(overrides, run_dir), *rest, **kwargs)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
        return super().launch(job_overrides, initial_job_idx)  # type: ignore[misc]


if SlurmLauncher is not None:  # launcher=slurm|submitit_local without the extra: storyexp/cli.py says which to install

    class ResumingSlurmLauncher(_Resuming, SlurmLauncher):
        pass

    class ResumingLocalLauncher(_Resuming, LocalLauncher):
        pass
