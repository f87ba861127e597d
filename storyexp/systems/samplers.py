"""Sampling schedulers by name: `ddim`, `pndm` (AR-LDM's two, set up as the original did), the fewer-step
multistep solvers `dpm` (DPM-Solver++, 2nd order) and `unipc` (UniPC, bh2 predictor-corrector), `euler`, `ddpm`,
or any diffusers scheduler class name (e.g. `DPMSolverMultistepScheduler`, `EulerDiscreteScheduler`).

All of them take the training noise schedule (β range, schedule type, T) from the DDPM scheduler the model
was trained with, so a checkpoint is always sampled with its own schedule.
"""

from __future__ import annotations

import diffusers

from storyexp.errors import ConfigurationError

# AR-LDM's settings (arldm.md §3.5): DDIM with clip_sample=False and set_alpha_to_one=True (eta 0);
# PNDM with skip_prk_steps=True; no timestep offset.
ALIASES = {
    "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True, "steps_offset": 0}),
    # DPM-Solver++ 2M (Lu et al. 2022): 2nd-order multistep data prediction. These are diffusers' defaults (0.42),
    # made explicit so that a change of those defaults cannot change what `dpm` means; the rest stays diffusers'
    # default (midpoint solver type, lower-order final steps, final sigma 0, linspace timestep spacing)
    "dpm": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    # UniPC (Zhao et al. 2023): the bh2 predictor-corrector on x0 prediction, 2nd order (diffusers' defaults, made
    # explicit the same way; corrector on every step, lower-order final steps, linspace timestep spacing)
    "unipc": ("UniPCMultistepScheduler", {"solver_type": "bh2", "predict_x0": True, "solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
    "ddpm": ("DDPMScheduler", {"clip_sample": False}),
}

TRAINING_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "prediction_type")


def make_scheduler(name: str, training_config) -> "diffusers.SchedulerMixin":
    class_name, extra = ALIASES.get(name.lower(), (name, {}))
    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ConfigurationError(
            f"Unknown sampling scheduler '{name}'. Use one of {', '.join(ALIASES)} or a diffusers scheduler "
            "class name such as DPMSolverMultistepScheduler."
        )
    base = {k: training_config[k] for k in TRAINING_KEYS if k in training_config}
    return cls.from_config({**base, **extra})
