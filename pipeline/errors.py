"""The one exception type the CLIs turn into a single stderr line and exit status 2."""


class UsageError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""


class ProcessError(UsageError):
    """A problem one process of a torchrun job met that the others may not have (it cannot read what rank 0 wrote):
    that process reports it, where bad input that every process meets is reported once, by rank 0."""
