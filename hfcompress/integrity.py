"""Damaged weight files found before a loader trips over them: one line naming the file and what is wrong with it."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .errors import HfCompressError, first_line

HEADER_SIZE_BYTES = 8  # a safetensors file opens with the length of its JSON header, a little-endian uint64


def check_weight_files(folder: str | Path) -> None:
    """Raise a one-line HfCompressError for the first safetensors file in `folder` that cannot be opened."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise HfCompressError(f"{path}: damaged safetensors file: {what_is_wrong(path, error)}") from None


def what_is_wrong(path: Path, error: Exception) -> str:
    """A truncated file says how much of it is there; anything else gets safetensors' own reason."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(HEADER_SIZE_BYTES)
        if len(prefix) < HEADER_SIZE_BYTES:
            return f"{size} bytes, too few for a safetensors header (an empty or cut-short file)"
        header_size = struct.unpack("<Q", prefix)[0]
        if HEADER_SIZE_BYTES + header_size > size:
            return (f"cut short, or not a safetensors file: {size:,} bytes, fewer than the "
                    f"{HEADER_SIZE_BYTES + header_size:,} its header alone announces")
        try:
            header = json.loads(handle.read(header_size))
            data_end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
                           default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return first_line(error)
    expected = HEADER_SIZE_BYTES + header_size + data_end
    if size < expected:
        return f"cut short: {size:,} of the {expected:,} bytes its header describes (an interrupted save or download?)"
    return first_line(error)
