"""The one exception type that reaches the user as `error: ...` (exit 2, no traceback)."""
import argparse


class UserError(Exception):
    """A problem with what the user asked for: bad flag, missing file, model we cannot run."""


def error_line(exc: BaseException) -> str:
    """`error: ...` for stderr; a name with undecodable bytes (a lone surrogate) is shown escaped, not raised on."""
    return f"error: {exc}".encode("utf-8", "backslashreplace").decode("utf-8")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes are a UserError (one `error:` line, exit 2), not usage plus two lines."""

    def error(self, message: str) -> None:
        raise UserError(message)
