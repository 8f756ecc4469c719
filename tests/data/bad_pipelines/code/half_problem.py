"""A problem file without get_inputs: parsed by `validate`, never imported."""

raise RuntimeError("validate must not run this file")


class Model:
    pass


def get_init_inputs():
    return []
