"""The exception types a verb reports as one line: bad input (exit 2) and a failing environment (exit 1)."""


class UserError(Exception):
    """Bad input: the message names the input and what to do about it."""


class EnvironmentFault(Exception):
    """The machine, not the input, stopped the run (disk full): one line naming the path and what was needed."""
