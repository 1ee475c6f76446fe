class HfCompressError(Exception):
    """A user-facing error: one line that names the problem and where it is."""


def first_line(error: Exception) -> str:
    """The first line of an exception's message (or its type when it has none), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
