"""Hand-written Triton kernels and the registry of verified variants.

Imports only torch, triton, numpy and the standard library at module level.
"""
