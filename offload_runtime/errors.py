"""The one exception type that reaches the user as `error: ...` (exit 2, no traceback)."""


class UserError(Exception):
    """A problem with what the user asked for: bad flag, missing file, model we cannot run."""
