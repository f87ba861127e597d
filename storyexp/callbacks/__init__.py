"""Lightning callbacks shared by every system (story grids, story metrics during training and at test time, and
what a resumed fit needs: RNG states and the training loader's position; a checkpoint and a requeue on
pre-emption; progress as log lines when the output is not a terminal)."""

from storyexp.callbacks.evaluation import StoryEvaluation
from storyexp.callbacks.grids import StoryGridLogger
from storyexp.callbacks.preemption import Preemption
from storyexp.callbacks.progress_log import ProgressLog
from storyexp.callbacks.resume_state import ResumeState
from storyexp.callbacks.validation_metrics import ValidationMetrics

__all__ = ["Preemption", "ProgressLog", "ResumeState", "StoryEvaluation", "StoryGridLogger", "ValidationMetrics"]
