"""The one exception type for mistakes a user can make.

The CLI catches :class:`UserError` and prints its message as a single line with exit status 2.
Everything else (programming errors) is left to fail loudly with a traceback.
"""


class UserError(Exception):
    """A mistake in input, configuration or files that the user can fix.

    The message says what is wrong and how to fix it, in one line.
    """
