"""The line each benchmark ends with per target: `target NAME: MEASURED (goal OP VALUE) PASS|FAIL`."""

import operator

_OPS = {">=": operator.ge, "<=": operator.le}


def target(name: str, measured: float, op: str, goal: float, *, unit: str = "", digits: int = 2) -> None:
    verdict = "PASS" if _OPS[op](measured, goal) else "FAIL"
    print(f"target {name}: {measured:.{digits}f}{unit} (goal {op} {goal:g}{unit}) {verdict}")
