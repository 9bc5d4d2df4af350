"""Always-available tools: arithmetic, image cropping, and the final answer."""

from __future__ import annotations

import ast
import math
import operator
from typing import Any

from tracetune.tools.spec import ToolContext, ToolError, ToolResult, tool

_BINOPS: dict[type[ast.operator], Any] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Any] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCS: dict[str, Any] = {
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
    "sum": lambda *a: sum(a),
    "sqrt": math.sqrt,
    "log": math.log,
    "log10": math.log10,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "floor": math.floor,
    "ceil": math.ceil,
}
_CONSTS = {"pi": math.pi, "e": math.e}


# Bounds that keep one call cheap for the host, whatever the expression: its length, its
# nesting, and the size of every integer it builds (a Python int can grow without limit).
MAX_EXPRESSION_CHARS = 2000
MAX_DEPTH = 100
MAX_INT_BITS = 4096


def _bounded(value: Any) -> Any:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ToolError(f"the result is too large (over {MAX_INT_BITS} bits)")
    return value


def safe_eval(expression: str) -> float | int:
    """Evaluate arithmetic by walking its syntax tree: no names, attributes or calls
    beyond a fixed list of math functions, bounded exponents, length, depth and size."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(
            f"the expression is {len(expression)} characters long, over the "
            f"{MAX_EXPRESSION_CHARS} character limit; compute parts of it separately"
        )
    expression = expression.replace("^", "**").replace("×", "*").replace("÷", "/")
    expression = expression.replace(",", "") if "(" not in expression else expression
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as exc:
        raise ToolError(f"not an arithmetic expression: {expression[:200]!r}") from exc

    def ev(node: ast.AST, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise ToolError(f"the expression is nested more than {MAX_DEPTH} levels deep")
        depth += 1
        if isinstance(node, ast.Expression):
            return ev(node.body, depth)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return _bounded(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ev(node.left, depth), ev(node.right, depth)
            if isinstance(node.op, ast.Pow):
                if abs(right) > 100:
                    raise ToolError("exponent too large")
                if isinstance(left, int) and isinstance(right, int):
                    if left.bit_length() * abs(right) > MAX_INT_BITS:
                        raise ToolError(f"the result is too large (over {MAX_INT_BITS} bits)")
            if isinstance(node.op, ast.Mult) and isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
                    raise ToolError(f"the result is too large (over {MAX_INT_BITS} bits)")
            return _bounded(_BINOPS[type(node.op)](left, right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand, depth))
        if isinstance(node, ast.Name) and node.id in _CONSTS:
            return _CONSTS[node.id]
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCS
            and not node.keywords
        ):
            return _bounded(_FUNCS[node.func.id](*[ev(a, depth) for a in node.args]))
        raise ToolError(f"unsupported element in expression: {ast.dump(node)[:60]}")

    try:
        value: float | int = ev(tree)
    except ZeroDivisionError as exc:
        raise ToolError("division by zero") from exc
    except (OverflowError, ValueError, TypeError) as exc:
        raise ToolError(f"cannot evaluate {expression[:200]!r}: {exc}") from exc
    if isinstance(value, float):
        value = round(value, 10)
        if value.is_integer():
            return int(value)
    return value


@tool
def calculator(expression: str) -> float:
    """Evaluate an arithmetic expression and return the number.

    Args:
        expression: Arithmetic such as '(12.5 + 3) * 2' or 'sqrt(16) / 4'. Supports
            + - * / // % ** and abs, round, min, max, sum, sqrt, log, exp, floor, ceil.
    """
    return safe_eval(expression)


@tool(output_type="image")
def image_crop(ctx: ToolContext, image: str, box: list[float]) -> ToolResult:
    """Crop a region out of an image and return it as a new image.

    Args:
        image: File name of the image in the working directory.
        box: Region as [x1, y1, x2, y2] in pixels (or fractions of width/height if all <= 1).
    """
    img = ctx.image(image)
    if len(box) != 4:
        raise ToolError(f"box must have 4 numbers [x1, y1, x2, y2], got {box!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if max(x1, y1, x2, y2) <= 1.0:
        x1, x2 = x1 * img.width, x2 * img.width
        y1, y2 = y1 * img.height, y2 * img.height
    x1, x2 = sorted((max(0.0, x1), min(float(img.width), x2)))
    y1, y2 = sorted((max(0.0, y1), min(float(img.height), y2)))
    if x2 - x1 < 1 or y2 - y1 < 1:
        raise ToolError(f"box {box!r} is empty inside a {img.width}x{img.height} image")
    crop = img.crop((round(x1), round(y1), round(x2), round(y2)))
    return ToolResult(text=f"cropped {crop.width}x{crop.height} region", images=[crop])


@tool
def final_answer(answer: str) -> ToolResult:
    """Give the final answer to the task and end the episode.

    Args:
        answer: The answer, as short as the question allows (a number, word or phrase).
    """
    return ToolResult(text=str(answer), data=answer, final=True)
