"""Exception types: every error a user can cause names the offending slide, file or key."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "EncoderError",
    "HistoAlignError",
    "PromptBagError",
    "SlideError",
    "StoreError",
    "WeightsError",
]


class HistoAlignError(Exception):
    """Base class for errors reported to the user without a traceback."""


class ConfigError(HistoAlignError):
    """Invalid configuration (names the key and the value)."""


class SlideError(HistoAlignError):
    """A slide cannot be opened, read or interpreted (names the slide file)."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"slide {self.path!r}: {problem}")


class StoreError(HistoAlignError):
    """A feature store is missing, incomplete or inconsistent."""


class EncoderError(HistoAlignError):
    """Unknown encoder, unavailable adapter, or mismatching model."""


class WeightsError(EncoderError):
    """Model weights missing, unsafe or corrupt."""


class PromptBagError(HistoAlignError):
    """Invalid prompt bag (names the bad key)."""
