"""Lightning callbacks shared by every system (story grids, story metrics during training and at test time, and
what a resumed fit needs: RNG states and the training loader's position; a checkpoint and a requeue on
pre-emption)."""

from storyexp.callbacks.evaluation import StoryEvaluation
from storyexp.callbacks.grids import StoryGridLogger
from storyexp.callbacks.preemption import Preemption
from storyexp.callbacks.resume_state import ResumeState
from storyexp.callbacks.validation_metrics import ValidationMetrics

__all__ = ["Preemption", "ResumeState", "StoryEvaluation", "StoryGridLogger", "ValidationMetrics"]
