"""Report tool of the document pipeline: one JSON report from whichever branch ran."""

from __future__ import annotations


def render(extract: dict | None = None, summarize: dict | str | None = None) -> dict:
    """{"kind": "fields" | "summary", ...} from the extraction or the summary."""
    if extract is not None:
        return {"kind": "fields", "total": extract.get("total"), "dates": extract.get("dates", [])}
    return {"kind": "summary", "text": summarize if isinstance(summarize, str) else (summarize or {}).get("text", "")}
