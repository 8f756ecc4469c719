"""The vocabulary every component shares: the stage-to-optimize abstraction and its fingerprint
(`problem`), device facts and classes (`devices`), precision policies and the tolerance table
(`precision`).

The bottom layer: imports only torch and the standard library, and nothing else of hetforge but
`hetforge.config`.
"""
