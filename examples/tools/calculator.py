"""Calculator tool of the voice agent: evaluates arithmetic safely (no eval; an AST walk)."""

from __future__ import annotations

import ast
import operator

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        right = _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:  # keep results small and fast
            raise ValueError("exponent too large")
        return _BINARY[type(node.op)](_eval(node.left), right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")


def calculate(expression: str) -> dict:
    """{"expression", "value"} for an arithmetic expression; ValueError for anything else."""
    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")
    return {"expression": expression, "value": _eval(ast.parse(expression, mode="eval").body)}
