"""What the report shows of the slides that failed: their count at the top, and each one
with the error line its batch recorded (``predictions.csv`` rows with status ``failed``)."""

from __future__ import annotations

import html

import pandas as pd

__all__ = ["failed_section", "failed_summary"]


def _failed(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["status"] == "failed"] if "status" in table else table.iloc[0:0]


def failed_summary(table: pd.DataFrame) -> str:
    """``, 2 failed`` (or nothing) for the line that counts the slides."""
    n = len(_failed(table))
    return f", <a href='#failed'><b class='failed'>{n} failed</b></a>" if n else ""


def failed_section(table: pd.DataFrame) -> str:
    """A table of every failed slide with its error line (empty when none failed)."""
    bad = _failed(table)
    if not len(bad):
        return ""
    errors = bad["error"] if "error" in bad else pd.Series([""] * len(bad), index=bad.index)
    rows = "".join(
        f"<tr><td>{html.escape(str(s))}</td><td>{html.escape(str(e) if isinstance(e, str) else '')}</td></tr>"
        for s, e in zip(bad["slide_id"], errors, strict=True)
    )
    return (
        f"<h2 id='failed'>Failed slides ({len(bad)})</h2><div class='scroll'><table id='failed-slides'>"
        f"<tr><th>slide</th><th>error</th></tr>{rows}</table></div><p>These slides have no prediction "
        "and are not in the metrics; the next run tries them again (<code>failed_slides.tsv</code>).</p>"
    )
