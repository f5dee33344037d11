"""Errors a user can cause: the CLI turns them into one sentence and exit code 2."""


class UserError(ValueError):
    """Bad input (config, path, flag, file) with a message that names what to fix."""
