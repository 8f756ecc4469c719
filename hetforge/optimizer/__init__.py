"""Verification and kernel-generation agents.

Imports only torch, triton, numpy and the standard library at module level: this package runs on
bare GPU hosts that have no pydantic, ray or fastapi.
"""
