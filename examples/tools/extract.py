"""Field-extraction tool of the document pipeline: pulls totals and dates out of OCR text."""

from __future__ import annotations

import re


def extract_fields(text: str) -> dict:
    """Amounts and ISO dates found in the text, with the largest amount as the total."""
    amounts = [float(a.replace(",", "")) for a in re.findall(r"\b\d{1,3}(?:,\d{3})*(?:\.\d{2})\b", text)]
    dates = re.findall(r"\b\d{4}-\d{2}-\d{2}\b", text)
    return {"amounts": amounts, "total": max(amounts) if amounts else None, "dates": dates}
