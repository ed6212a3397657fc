"""User-facing errors: anything the user can fix by changing input.

The CLI turns a `UserError` into one line on stderr and exit code 2; the HTTP layer turns it into a 4xx.
Everything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input from the user: a flag, a file, a path. The message is shown as is, on one line."""


def one_line(message: object, limit: int | None = None) -> str:
    """`message` (an exception, or any text) with its whitespace runs, newlines included, folded to single spaces,
    cut to `limit` characters: how another library's error is quoted inside one line of ours."""
    text = " ".join(str(message).split())
    return text if limit is None else text[:limit]
