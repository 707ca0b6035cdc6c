"""The one exception type that reaches the user as `error: ...` (exit 2, no traceback)."""


class UserError(Exception):
    """A problem with what the user asked for: bad flag, missing file, model we cannot run."""


def error_line(exc: BaseException) -> str:
    """`error: ...` for stderr; a name with undecodable bytes (a lone surrogate) is shown escaped, not raised on."""
    return f"error: {exc}".encode("utf-8", "backslashreplace").decode("utf-8")
