"""The base of the errors meant for the user, in a module that imports nothing, so the CLI can catch
them all without importing the (heavier) modules that raise them."""


class UserError(RuntimeError):
    """Bad input or state the user can fix; the message says what and how, so the CLI prints it
    as one paragraph instead of a traceback."""
