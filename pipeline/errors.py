"""The one exception type the CLIs turn into a single stderr line and exit status 2."""


class UsageError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""
