"""Cells of the CSV files people open in spreadsheets, made inert: a cell that begins with
``=``, ``+``, ``-``, ``@``, a tab or a carriage return is a formula to Excel, LibreOffice
and Google Sheets (``=HYPERLINK(...)``, ``+cmd|' /C calc'!A0``), so it is written with a
leading apostrophe, as OWASP advises ("CSV Injection"). Only text cells change; numbers
stay numbers, and the JSON outputs keep every name exactly."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["FORMULA_START", "inert_cell", "inert_table"]

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def inert_cell(value: Any) -> Any:
    """``value`` with an apostrophe before a leading formula character (text only)."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def inert_table(table: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``table`` whose text cells (and column names) are inert."""
    out = table.copy()
    for col in out.columns:
        if getattr(out[col].dtype, "kind", "O") not in "biufcmM":  # text (object or str)
            out[col] = out[col].map(inert_cell)
    out.columns = [inert_cell(c) for c in out.columns]
    return out
