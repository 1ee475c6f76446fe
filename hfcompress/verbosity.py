"""What the command line shows: hfcompress's own stage lines and training progress, and the libraries' progress bars
(datasets' map/filter, transformers' shard loading and writing) and transformers' load reports only when asked."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import datasets
from transformers.utils import logging as transformers_logging


@contextmanager
def library_output(verbose: bool) -> Iterator[None]:
    """Without `verbose`, hide the libraries' progress bars and transformers' info and warnings (the load report among
    them; errors still show) until the block ends; hfcompress's own bars use tqdm directly and stay."""
    before = (datasets.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled(),
              transformers_logging.get_verbosity())
    if not verbose:
        datasets.disable_progress_bars()
        transformers_logging.disable_progress_bar()  # huggingface_hub's bars too
        transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets_bars, transformers_bars, verbosity = before
        if datasets_bars:
            datasets.enable_progress_bars()
        if transformers_bars:
            transformers_logging.enable_progress_bar()
        transformers_logging.set_verbosity(verbosity)
