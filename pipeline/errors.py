"""Errors a user can act on, and the exit statuses featpipe promises."""

EXIT_OK = 0
EXIT_ABORTED = 1
EXIT_USAGE = 2  # argparse's own status for a bad flag
EXIT_FAILURES = 3  # completed, but some samples or shards were recorded as failed


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line, never a traceback."""
