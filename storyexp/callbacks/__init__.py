"""Lightning callbacks shared by every system (story grids, story metrics during training and at test time, and
what a resumed fit needs: RNG states and the training loader's position)."""

from storyexp.callbacks.evaluation import StoryEvaluation
from storyexp.callbacks.grids import StoryGridLogger
from storyexp.callbacks.resume_state import ResumeState
from storyexp.callbacks.validation_metrics import ValidationMetrics

__all__ = ["ResumeState", "StoryEvaluation", "StoryGridLogger", "ValidationMetrics"]
