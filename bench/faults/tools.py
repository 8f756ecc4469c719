"""The fault-injection pipeline's tool: passes the features on."""


def prepare(x: list) -> dict:
    return {"x": x}
