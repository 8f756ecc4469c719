"""Tools of the ingress-hardening tests' pipeline (`hardened.yaml`)."""

import asyncio


async def prepare(x: list, sleep_s: float = 0.0, side: float | None = None) -> dict:
    """Pass `x` on after `sleep_s`; `side` (when given) is what the side branch `slowpoke` sleeps."""
    if sleep_s:
        await asyncio.sleep(sleep_s)
    return {"x": x} if side is None else {"x": x, "side": side}


async def slowpoke(sleep_s: float) -> dict:
    await asyncio.sleep(sleep_s)
    return {"late": False}
