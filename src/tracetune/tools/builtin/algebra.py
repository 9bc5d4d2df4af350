"""Symbolic maths with sympy: solve equations and systems without evaluating arbitrary code.

Expressions are parsed with ``sympy.parsing.sympy_parser.parse_expr`` against a whitelist
namespace (the variables, a few constants and functions), and the source is screened before
parsing: no attribute access, dunders, lambdas or string literals get through, so a model
cannot reach Python objects through the parser.
"""

from __future__ import annotations

import re
from tokenize import TokenError
from typing import Any

from tracetune.tools.spec import ToolError, ToolResult, tool

_FUNCTIONS = (
    "sqrt",
    "exp",
    "log",
    "ln",
    "sin",
    "cos",
    "tan",
    "asin",
    "acos",
    "atan",
    "sinh",
    "cosh",
    "tanh",
    "Abs",
    "abs",
    "floor",
    "ceiling",
    "factorial",
    "binomial",
    "root",
    "Rational",
    "pi",
    "E",
    "I",
    "oo",
)
_FORBIDDEN = re.compile(r"__|\.\s*[A-Za-z_]|\blambda\b|['\"`;\\]|\bimport\b|:=")
_MAX_LEN = 2000


def _namespace(variables: list[str]) -> dict[str, Any]:
    import sympy  # type: ignore[import-untyped]

    ns: dict[str, Any] = {name: getattr(sympy, name) for name in _FUNCTIONS if hasattr(sympy, name)}
    ns.update({"ln": sympy.log, "abs": sympy.Abs, "e": sympy.E})
    for var in variables:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", var):
            raise ToolError(f"variable names must be identifiers like x or t1, got {var!r}")
        ns[var] = sympy.Symbol(var)
    return ns


def _parse(text: str, ns: dict[str, Any]) -> Any:
    from sympy.parsing.sympy_parser import (  # type: ignore[import-untyped]
        convert_xor,
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    if len(text) > _MAX_LEN:
        raise ToolError(f"expression is longer than {_MAX_LEN} characters")
    if _FORBIDDEN.search(text):
        raise ToolError(f"unsupported syntax in {text!r}: write plain maths such as 2*x + 3")
    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
    # parse_expr evaluates the code it generates. The globals hold only the constructors
    # that generated code calls, builtins are gone, and the screen above rejects attribute
    # access and string literals, so only maths is reachable.
    import sympy

    global_dict: dict[str, Any] = {
        "__builtins__": {},
        "Integer": sympy.Integer,
        "Float": sympy.Float,
        "Rational": sympy.Rational,
        "Symbol": sympy.Symbol,
        "Function": sympy.Function,
    }
    try:
        return parse_expr(
            text, local_dict=dict(ns), global_dict=global_dict, transformations=transformations
        )
    except (SyntaxError, TypeError, NameError, ValueError, AttributeError, TokenError) as exc:
        raise ToolError(f"cannot parse {text!r}: {exc.__class__.__name__}: {exc}") from exc


def _equation(text: str, ns: dict[str, Any]) -> Any:
    import sympy

    text = text.replace("==", "=")
    if text.count("=") > 1 or any(op in text for op in ("<", ">", "!")):
        raise ToolError(f"{text!r} is not one equation: write 'lhs = rhs' or an expression = 0")
    if "=" in text:
        lhs, rhs = text.split("=")
        return sympy.Eq(_parse(lhs, ns), _parse(rhs, ns))
    return sympy.Eq(_parse(text, ns), 0)


def _fmt(value: Any) -> str:
    import sympy

    if value.is_number and not value.is_Integer and not value.is_Rational:
        return f"{sympy.sstr(value)} ≈ {sympy.N(value, 10)}"
    if value.is_Rational and not value.is_Integer:
        return f"{value} ≈ {sympy.N(value, 10)}"
    return str(sympy.sstr(value))


def _jsonable(value: Any) -> Any:
    if value.is_Integer:
        return int(value)
    if value.is_number and value.is_real:
        return float(value)
    return str(value)


@tool
def solver(equations: list[str], variables: list[str] | None = None) -> ToolResult:
    """Solve an equation or a system of equations exactly (sympy).

    Args:
        equations: Equations such as ['2*x + 3*y = 7', 'x - y = 1'] or ['x^2 - 4 = 0']; an
            expression without '=' is set equal to zero.
        variables: The unknowns to solve for, e.g. ['x', 'y']; by default every symbol that
            appears in the equations.
    """
    import sympy

    if isinstance(equations, str):
        equations = [equations]
    if not equations or not all(isinstance(e, str) and e.strip() for e in equations):
        raise ToolError("equations must be a non-empty list of strings like 'x + 1 = 3'")
    names = list(variables or [])
    if not names:
        found = re.findall(r"[A-Za-z][A-Za-z0-9_]*", " ".join(equations))
        names = sorted({n for n in found if n not in _FUNCTIONS and n not in ("e", "ln")})
    if not names:
        raise ToolError("no unknowns found: name them with variables=['x']")
    ns = _namespace(names)
    system = [_equation(e, ns) for e in equations]
    symbols = [ns[n] for n in names]
    try:
        solutions = sympy.solve(system, symbols, dict=True)
    except (NotImplementedError, ValueError, TypeError) as exc:
        raise ToolError(f"sympy could not solve this system: {exc}") from exc
    if not solutions:
        return ToolResult(text="no solution", data={"solutions": []})
    data = [{str(k): _jsonable(v) for k, v in sol.items()} for sol in solutions]
    lines = [", ".join(f"{k} = {_fmt(v)}" for k, v in sol.items()) for sol in solutions]
    head = "solution" if len(lines) == 1 else f"{len(lines)} solutions"
    return ToolResult(text=f"{head}: " + "; ".join(lines), data={"solutions": data})
