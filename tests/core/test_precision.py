"""Precision policies: which serves which."""

import pytest


def test_a_stricter_policy_serves_a_looser_one_and_never_the_reverse():
    from hetforge.core.precision import Precision, serves, serving_policies

    assert serving_policies("strict") == ("strict",)
    assert serving_policies("tf32") == ("strict", "tf32")
    assert serving_policies(Precision.BF16) == ("strict", "tf32", "bf16")
    assert serves("strict", "bf16") and not serves("bf16", "tf32") and not serves("tf32", "strict")
    with pytest.raises(ValueError, match='Got "fp8" for precision'):
        serves("fp8", "strict")
