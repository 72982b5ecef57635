"""Logging for the command line: our messages on stderr, library chatter (asyncio's
"Task was destroyed", tifffile's offset warnings, zarr's) silenced unless ``-v``: our
own error line says what went wrong."""

from __future__ import annotations

import logging
import sys
import warnings

__all__ = ["setup_logging"]

_NOISY = ("asyncio", "tifffile", "zarr", "numcodecs")


def setup_logging(*, verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if verbose:
        return
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module="zarr")
