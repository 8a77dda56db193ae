"""The one exception type that means "the user asked for something we cannot do".

Library code raises `UsageError` with a one-line message that says what is wrong and how to
fix it; the CLI turns it into exit code 2 with no traceback. Raise it before anything is
written, so that bad input leaves the store exactly as it was.
"""


class UsageError(Exception):
    """Bad input: a clear one-line message, exit code 2, nothing written."""
