"""Sort surviving mutants into kinds, for tools/mutation.sh ``kinds``.

A mutant is compared with the original function in mutmut's generated file
(``mutants/<slug>/mutants/<path>``) after masking, in both, the parts a kind ignores:

* ``log``: only the arguments of a ``log.<level>(...)`` statement differ (event names
  and keys of structlog lines);
* ``message``: only the arguments of the exception constructed in a ``raise`` differ
  (the human-readable text; the wire contract is the exception type and its ``code``);
* ``other``: anything else — reviewed by hand.

Usage: python tools/mutation_kinds.py GENERATED_ROOT < survivors.txt
(GENERATED_ROOT = mutants/<slug>/mutants) prints ``kind<TAB>mutant`` per line, then a
count per kind.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path


class _Mask(ast.NodeTransformer):
    def __init__(self, kind: str) -> None:
        self.kind = kind

    def visit_Expr(self, node: ast.Expr) -> ast.AST:
        call = node.value
        if (self.kind == "log" and isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                and isinstance(call.func.value, ast.Name) and call.func.value.id == "log"):
            return ast.Expr(ast.Constant("<log>"))
        return self.generic_visit(node)

    def visit_Raise(self, node: ast.Raise) -> ast.AST:
        if self.kind == "message" and isinstance(node.exc, ast.Call):
            node.exc.args, node.exc.keywords = [], []
        return self.generic_visit(node)


def _body(fn: ast.FunctionDef | ast.AsyncFunctionDef, kind: str) -> str:
    fn = _Mask(kind).visit(ast.parse(ast.unparse(fn)).body[0])
    return ast.dump(ast.Module(body=fn.body, type_ignores=[]))


def _defs(root: Path, module: str) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    path = root / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = root / module.replace(".", "/") / "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name: n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def main() -> None:
    root = Path(sys.argv[1])
    by_module: dict[str, dict[str, ast.FunctionDef | ast.AsyncFunctionDef]] = {}
    counts: Counter[str] = Counter()
    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        module, local = name.rsplit(".", 1)
        if module not in by_module:
            by_module[module] = _defs(root, module)
        defs = by_module[module]
        mutant, orig = defs.get(local), defs.get(local.rsplit("__mutmut_", 1)[0] + "__mutmut_orig")
        kind = "other"
        if mutant is not None and orig is not None:
            for candidate in ("log", "message"):
                if _body(mutant, candidate) == _body(orig, candidate):
                    kind = candidate
                    break
        counts[kind] += 1
        print(f"{kind}\t{name}")
    print("# " + " ".join(f"{k}={v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
