"""Errors that are the user's to fix (bad config, missing files, bad data).

`launch.py` prints these as one clear message instead of a traceback; anything else is a bug and keeps
its traceback. Data-format errors (`storyexp.data.StoryDataError`) are handled the same way.
"""


class StoryexpError(Exception):
    """Base class of the errors a user can act on."""


class ConfigurationError(StoryexpError, ValueError):
    """The composed config asks for something impossible (unknown name, incompatible options)."""


class MissingResourceError(StoryexpError, FileNotFoundError):
    """A dataset, weight file or checkpoint is not where the config says.

    The message says what is missing, where it was expected, and where to get it.
    """

    def __init__(self, what: str, where=None, how_to_get: str = ""):
        self.what, self.where, self.how_to_get = what, where, how_to_get
        if where is None:  # a complete, preformatted message
            super().__init__(what)
            return
        msg = f"{what} not found at '{where}'."
        if how_to_get:
            msg += f" {how_to_get}"
        super().__init__(msg)
