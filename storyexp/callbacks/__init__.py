"""Lightning callbacks shared by every system (story grids, test-time story evaluation)."""

from storyexp.callbacks.evaluation import StoryEvaluation
from storyexp.callbacks.grids import StoryGridLogger

__all__ = ["StoryEvaluation", "StoryGridLogger"]
