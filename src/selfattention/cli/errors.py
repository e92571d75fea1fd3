"""The command line's own error type."""


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit code 2."""
