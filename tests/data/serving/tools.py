"""Tools of the serving tests' pipeline."""

import asyncio


async def prepare(x: list, fail: bool = False, sleep_s: float = 0.0) -> dict:
    """Pass `x` on; raise when asked to; sleep first when asked to (a tool that times out)."""
    if fail:
        raise RuntimeError("asked to fail")
    if sleep_s:
        await asyncio.sleep(sleep_s)
    return {"x": x}
