"""`calculator`: exact arithmetic on integers and decimals, for the bundled tool-calling task."""

from __future__ import annotations

import ast
import operator
from decimal import Decimal, InvalidOperation, localcontext

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_DIGITS = 60  # longer numbers are refused: a policy must not make the tool compute forever


def _value(node: ast.AST) -> Decimal:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return Decimal(str(node.value))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_value(node.left), _value(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    raise ValueError(f"only numbers and + - * / // % are allowed, not {ast.unparse(node)!r}")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly and return the result.

    Args:
        expression: numbers joined by + - * / // % and parentheses, e.g. "123456+654321".

    Returns:
        The result as text: an integer where it is one ("777777"), else a decimal.
    """
    if len(expression) > 4 * MAX_DIGITS:
        raise ValueError(f"the expression is longer than {4 * MAX_DIGITS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"{expression!r} is not an arithmetic expression") from None
    with localcontext() as context:
        context.prec = MAX_DIGITS
        try:
            result = _value(tree.body)
        except (InvalidOperation, ZeroDivisionError):
            raise ValueError(f"{expression!r} has no finite value (division by zero?)") from None
        if result == result.to_integral_value():
            return str(int(result))
        return format(result.normalize(), "f")
