"""Errors that mean "the user asked for something wrong".

The CLI prints them as one line on stderr and exits with status 2 (no
traceback unless ``--debug``). Everything else is a bug and keeps its traceback.
"""


class UsageError(Exception):
    """Bad input: an unknown name, an impossible size, a missing or corrupt file."""


class NonFiniteLossError(UsageError):
    """The loss became NaN or inf; the last good checkpoint was kept."""


class ComponentError(UsageError):
    """A plugin's component raised or returned something the interface does not allow; the message names
    the component, its plugin and what went wrong (the original exception is the ``__cause__``)."""
