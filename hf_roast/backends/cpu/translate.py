"""The mapping and quantisation formulas as C, translated from their Python source (never written by hand).

The CPU kernel (``roast_cpu.cpp``) needs the element formulas inside its loops: element signs, the HashedNet
slot, where a packed code is stored and how it dequantises. They are not written a second time in C:
:func:`c_formulas` translates the Python functions of :func:`hf_roast.mapping.formula_functions` and
:func:`hf_roast.quant.formula_functions`, as :mod:`hf_roast.backends.triton.mapping_jit` recompiles them for
Triton, so a changed formula reaches every backend at once. The translator knows a small subset of Python
(integer arithmetic, ``==``, assignments, returns, ``if``) and raises on anything else, so a formula it does
not understand can never be mistranslated silently.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

from hf_roast import quant
from hf_roast.mapping import formula_constants, formula_functions, tiles_along

_C_OPS = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Mod: "%",  # C truncates where Python floors: equal on the non-negative values the formulas take
    ast.FloorDiv: "/",
    ast.RShift: ">>",
    ast.BitXor: "^",
    ast.BitAnd: "&",
}


def _c_expr(node: ast.AST, constants: dict[str, int], functions: set[str], where: str) -> str:
    if isinstance(node, ast.BinOp) and type(node.op) in _C_OPS:
        left = _c_expr(node.left, constants, functions, where)
        right = _c_expr(node.right, constants, functions, where)
        return f"({left} {_C_OPS[type(node.op)]} {right})"
    if (
        isinstance(node, ast.Compare)
        and len(node.ops) == 1
        and isinstance(node.ops[0], ast.Eq)
        and len(node.comparators) == 1
    ):
        left = _c_expr(node.left, constants, functions, where)
        right = _c_expr(node.comparators[0], constants, functions, where)
        return f"({left} == {right})"
    if isinstance(node, ast.Name):
        if node.id in constants:
            return f"INT64_C({constants[node.id]})"
        return node.id
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return f"INT64_C({node.value})"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in functions:
        args = ", ".join(_c_expr(a, constants, functions, where) for a in node.args)
        return f"{node.func.id}({args})"
    raise NotImplementedError(
        f"hf_roast.backends.cpu.translate cannot translate {ast.dump(node)[:80]} in {where} to C; extend _c_expr."
    )


def _c_statements(
    body: list[ast.stmt],
    params: set[str],
    local: set[str],
    constants,
    done: set[str],
    where: str,
    indent: str,
    ctype: str,
) -> list[str]:
    """Assignments (of ``ctype`` locals), returns and ``if`` blocks (whose bodies only return or branch) as C."""
    lines = []
    for stmt in body:
        if (
            isinstance(stmt, ast.Assign)
            and len(stmt.targets) == 1
            and isinstance(stmt.targets[0], ast.Name)
            and indent == "  "
        ):
            name = stmt.targets[0].id
            decl = "" if name in local or name in params else f"{ctype} "
            local.add(name)
            lines.append(f"{indent}{decl}{name} = {_c_expr(stmt.value, constants, done, where)};")
        elif isinstance(stmt, ast.Return) and stmt.value is not None:
            lines.append(f"{indent}return {_c_expr(stmt.value, constants, done, where)};")
        elif isinstance(stmt, ast.If):
            lines.append(f"{indent}if ({_c_expr(stmt.test, constants, done, where)}) {{")
            lines += _c_statements(stmt.body, params, local, constants, done, where, indent + "  ", ctype)
            if stmt.orelse:
                lines.append(f"{indent}}} else {{")
                lines += _c_statements(
                    stmt.orelse, params, local, constants, done, where, indent + "  ", ctype
                )
            lines.append(f"{indent}}}")
        else:
            raise NotImplementedError(
                f"hf_roast.backends.cpu.translate cannot translate a statement of {where}."
            )
    return lines


def _translate(functions, constants: dict[str, int], module: str, float_functions=frozenset()) -> str:
    """Python formulas as C functions: ``int64_t`` arguments and result, or ``float`` for ``float_functions``
    (the dequantisation's ``code * scale``). Formulas returning a tuple (tile coordinates) are left out:
    the kernel's loops walk tiles and elements in that very order. Anything the translator does not know
    raises, so a changed formula cannot be mistranslated silently."""
    done: set[str] = set()
    out = []
    for fn in functions:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        fdef = tree.body[0]
        assert isinstance(fdef, ast.FunctionDef)
        body = [s for s in fdef.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        if any(isinstance(s, ast.Return) and isinstance(s.value, ast.Tuple) for s in body):
            continue
        ctype = "float" if fdef.name in float_functions else "int64_t"
        params = {a.arg for a in fdef.args.args}
        signature = ", ".join(f"{ctype} {a.arg}" for a in fdef.args.args)
        where = f"{module}.{fdef.name}"
        lines = _c_statements(body, params, set(), constants, done, where, "  ", ctype)
        out.append(f"static inline {ctype} {fdef.name}({signature}) {{\n" + "\n".join(lines) + "\n}")
        done.add(fdef.name)
    return "\n".join(out)


def c_formulas() -> str:
    """The scalar formulas of :func:`hf_roast.mapping.formula_functions` (slots, signs), the tile count
    :func:`hf_roast.mapping.tiles_along`, and those of
    :func:`hf_roast.quant.formula_functions` (where a packed code is stored, its group, its signed value,
    its dequantisation) as C functions, translated from their Python source."""
    mapping_c = _translate([tiles_along, *formula_functions()], formula_constants(), "mapping")
    quant_c = _translate(
        quant.formula_functions(), quant.formula_constants(), "quant", frozenset({"dequantize_value"})
    )
    return mapping_c + "\n" + quant_c
