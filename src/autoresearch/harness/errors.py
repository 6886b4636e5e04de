"""The one exception type the harness raises for bad input, so the CLI can print it as a paragraph."""
from autoresearch.errors import UserError


class HarnessError(UserError):
    """Bad input or state the user can fix: the message names the file and the fix."""
