"""Errors that reach the user as one clear line (the CLI prints them, exit 2)."""


class UserError(RuntimeError):
    """Bad input from the user: a missing file, a wrong shard, an unknown class id."""


class DiskFull(UserError):
    """No space left on the device a checkpoint or a shard is written to; nothing partial was kept."""
