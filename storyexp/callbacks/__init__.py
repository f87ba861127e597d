"""Lightning callbacks shared by every system (story grids, story metrics during training and at test time)."""

from storyexp.callbacks.evaluation import StoryEvaluation
from storyexp.callbacks.grids import StoryGridLogger
from storyexp.callbacks.validation_metrics import ValidationMetrics

__all__ = ["StoryEvaluation", "StoryGridLogger", "ValidationMetrics"]
