"""Tools of the re-optimization tests' pipeline."""


def prepare(x: list) -> dict:
    """Pass the features on."""
    return {"x": x}
