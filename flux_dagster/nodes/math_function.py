"""Math function (``mathFunction``), reference §4.4.

The original evaluates with the JS ``expr-eval`` parser. Here a small evaluator walks Python's
AST and accepts only numbers, arithmetic, comparisons, boolean operators and a whitelist of math
functions and constants: nothing can reach attributes, names outside the whitelist, or ``eval``.
"""

from __future__ import annotations

import ast
import math
import re
from typing import Any

from flux_dagster.errors import UserConfigError
from flux_dagster.execution import NodeOutcome, NodeTask, persist_node_success
from flux_dagster.nodes.fields import Sessions

NODE_TYPE = "mathFunction"
MAX_FORMULA_CHARS = 2000


def _round(x: float, digits: float = 0) -> float:
    # JS Math.round / expr-eval roundTo: halves go up, not to the even neighbour.
    factor = 10 ** int(digits)
    return math.floor(x * factor + 0.5) / factor


FUNCTIONS = {
    "abs": abs, "ceil": math.ceil, "floor": math.floor, "round": _round, "trunc": math.trunc,
    "sqrt": math.sqrt, "cbrt": math.cbrt, "exp": math.exp, "expm1": math.expm1,
    "log": math.log, "ln": math.log, "log10": math.log10, "log2": math.log2, "log1p": math.log1p,
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin, "acos": math.acos,
    "atan": math.atan, "atan2": math.atan2, "sinh": math.sinh, "cosh": math.cosh, "tanh": math.tanh,
    "min": min, "max": max, "pow": math.pow, "hypot": math.hypot,
    "sign": lambda x: float((x > 0) - (x < 0)),
}
CONSTANTS = {"PI": math.pi, "E": math.e, "pi": math.pi, "e": math.e, "true": 1.0, "false": 0.0}

_BINARY = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b, ast.Mod: math.fmod, ast.Pow: math.pow,
}
_COMPARE = {
    ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
}


def _to_python_syntax(formula: str) -> str:
    # expr-eval's ``^`` is power and binds like Python's ``**``; ``&&``/``||``/``!`` are not in it.
    return formula.replace("^", "**")


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    if isinstance(node, ast.Name):
        if node.id in CONSTANTS:
            return CONSTANTS[node.id]
        raise UserConfigError(f"Unknown variable or name '{node.id}' in the formula.", field="formula")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
        value = _eval(node.operand)
        if isinstance(node.op, ast.Not):
            return float(not value)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return float(_BINARY[type(node.op)](_eval(node.left), _eval(node.right)))
    if isinstance(node, ast.BoolOp):
        values = [_eval(v) for v in node.values]
        return float(all(values) if isinstance(node.op, ast.And) else any(values))
    if isinstance(node, ast.Compare):
        left = _eval(node.left)
        for op, comparator in zip(node.ops, node.comparators):
            if type(op) not in _COMPARE:
                break
            right = _eval(comparator)
            if not _COMPARE[type(op)](left, right):
                return 0.0
            left = right
        else:
            return 1.0
    if isinstance(node, ast.IfExp):
        return _eval(node.body) if _eval(node.test) else _eval(node.orelse)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS
            and not node.keywords):
        return float(FUNCTIONS[node.func.id](*(_eval(a) for a in node.args)))
    raise UserConfigError(f"The formula uses something a math formula cannot: {ast.unparse(node)!r}.",
                          field="formula")


def evaluate(formula: str) -> float:
    """The formula's value; any mistake in it is a UserConfigError."""
    if not formula.strip():
        raise UserConfigError("The formula is empty.", field="formula")
    if len(formula) > MAX_FORMULA_CHARS:
        raise UserConfigError(f"The formula is longer than {MAX_FORMULA_CHARS} characters.", field="formula")
    try:
        tree = ast.parse(_to_python_syntax(formula.strip()), mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as exc:
        raise UserConfigError(f"The formula is not valid: {getattr(exc, 'msg', 'too deeply nested')}.",
                              field="formula") from exc
    try:
        value = _eval(tree)
    except ZeroDivisionError as exc:
        raise UserConfigError("The formula divides by zero.", field="formula") from exc
    except RecursionError as exc:
        raise UserConfigError("The formula is too deeply nested.", field="formula") from exc
    except (OverflowError, ValueError, TypeError) as exc:  # math domain errors, wrong argument counts
        raise UserConfigError(f"The formula cannot be computed: {exc}.", field="formula") from exc
    if not math.isfinite(value):
        raise UserConfigError("The formula's result is not a finite number.", field="formula")
    return value


def _value_text(value: Any) -> str:
    text = "" if value is None else str(value).strip()
    try:
        float(text)
    except ValueError:
        return text
    # A negative number must stay one operand: ``x^2`` with x = -3 is 9, not -(3^2).
    return f"({text})"


def substitute(formula: str, variables: list[dict[str, Any]]) -> str:
    """Whole-word replacement of each variable name by its value, in array order."""
    for variable in variables or []:
        name = str(variable.get("name") or "").strip() if isinstance(variable, dict) else ""
        if not name:
            continue
        pattern = rf"(?<![\w$]){re.escape(name)}(?![\w$])"
        replacement = _value_text(variable.get("value"))
        formula = re.sub(pattern, lambda _m: replacement, formula)
    return formula


def as_number(value: float) -> int | float:
    """Whole results are written as integers, as a JS number would serialise."""
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


def compute(data: dict[str, Any]) -> int | float:
    return as_number(evaluate(substitute(str(data.get("formula") or ""), data.get("variables") or [])))


def run_math_function(sessions: Sessions, task: NodeTask) -> NodeOutcome:
    result = compute(task.data)
    with sessions() as session:
        persist_node_success(session, task, data_updates={"result": result}, output=str(result), output_type="json")
    return NodeOutcome(task=task, output={"result": result}, message="Node executed successfully")
