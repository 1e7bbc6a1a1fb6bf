"""The one exception type that means "the user's input is wrong" (exit code 2, one line, no traceback)."""


class UserError(Exception):
    """Bad input: the message names the input and what to do about it."""
