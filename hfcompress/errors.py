class HfCompressError(Exception):
    """A user-facing error: one line that names the problem and where it is."""
