"""Errors a user can cause: entry points print the message and exit non-zero without a traceback."""


class UserError(Exception):
    """A problem the user can fix (missing data, bad config, malformed file...).

    The message must say what was expected and how to fix it.
    """
