"""Tools of the serving tests' pipeline."""

import asyncio


async def prepare(
    x: list | None = None,
    messages: list | None = None,
    last_user_message: str | None = None,
    fail: bool = False,
    sleep_s: float = 0.0,
) -> dict:
    """Pass `x` on (or 16 features made from the last chat message); raise when asked to; sleep first when asked to.
    A chat completion's entry input is {messages, last_user_message}."""
    if fail:
        raise RuntimeError("asked to fail")
    if sleep_s:
        await asyncio.sleep(sleep_s)
    if x is None and messages:
        text = (messages[-1].get("content") or " ") * 16
        x = [[float(ord(c) % 7) - 3.0 for c in text[:16]]]
    return {"x": x}
