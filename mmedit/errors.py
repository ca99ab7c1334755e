"""The one exception type users see.

Every bad input (missing image, malformed row, wrong base model, corrupt delta, NaN loss, unknown
option...) raises `MmeditError` with a single line that names the offending thing. The CLI prints that
line and exits non-zero; anything else escaping is a bug.
"""


class MmeditError(Exception):
    """A user-facing error: one line, naming the file/parameter/option at fault."""


def first_line(error: BaseException) -> str:
    """An exception's message, cut to its first line (MmeditError messages are one line)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
