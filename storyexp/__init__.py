"""storyexp: a Hydra-driven experiment framework for story visualization and story continuation."""

__version__ = "0.1.0"
