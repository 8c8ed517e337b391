"""The one exception type that reaches the user as a single line (the CLI prints it without a traceback)."""


class UserError(Exception):
    """A problem the user can fix: the message names what is wrong and how to fix it."""
