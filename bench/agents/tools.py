"""The agent benchmark's tool: an order lookup (the Literal becomes an enum in the tool's schema)."""

from __future__ import annotations

from typing import Literal


def lookup_order(order_id: Literal["1234", "5678"]) -> dict:
    """An order's status."""
    return {"order_id": order_id, "status": {"1234": "shipped", "5678": "packed"}[order_id]}
