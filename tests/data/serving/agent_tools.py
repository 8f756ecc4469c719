"""Tools of the OpenAI test pipeline's agent loop."""

from __future__ import annotations

from typing import Literal

ORDERS = {"1234": "shipped", "5678": "packed"}


def lookup_order(order_id: Literal["1234", "5678"]) -> dict:
    """An order's status; the Literal becomes an enum in the tool's schema, so decoding can only pick a known id."""
    return {"order_id": order_id, "status": ORDERS[order_id]}
