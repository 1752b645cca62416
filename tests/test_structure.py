"""The shape of the code, checked: no import cycles, no module importing from a layer above its own, no
private name used across modules, no page over 250 lines. Read from the source (ast): nothing is imported.

Every import counts, also those inside functions (an import moved into a function to dodge a cycle is still
a cycle), and importing `a.b.c` counts as importing the package `a.b` too (its `__init__` runs first).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top: a module may import from its own layer and the layers below, never from one above.
# (A layer is a list of module prefixes; a module belongs to the layer of its longest matching prefix; a module
# in no layer fails the test: place it.)
LAYERS: list[tuple[str, list[str]]] = [
    ("base: errors, named things, process settings, shipped files",
     ["moeviz", "moeviz.errors", "moeviz.registry", "moeviz.runtime_config", "moeviz.resources"]),
    ("models and data: loading, the uniform MoE view, runtimes, token windows",
     ["moeviz.models", "moeviz.data", "moeviz.demo"]),
    ("calibration: routing statistics, Hessians", ["moeviz.calibration"]),
    ("compression: plans, resolution, kernels, the Compressor", ["moeviz.compression"]),
    ("runs: the run store, run views, timing, the token explorer",
     ["moeviz.store", "moeviz.runview", "moeviz.latency_ab", "moeviz.explorer"]),
    ("evaluation", ["moeviz.evaluation"]),
    ("presentation and caches: figures, calibration cache, export destinations",
     ["moeviz.figures", "moeviz.qualityview", "moeviz.workspace", "moeviz.destination"]),
    ("workflows on a compressed model: recovery, sensitivity, export",
     ["moeviz.recovery", "moeviz.sensitivity", "moeviz.export", "moeviz.ct_export", "moeviz.compare"]),
    ("the session: one person's model, calibration, plan and evaluation path", ["moeviz.session"]),
    ("entry points", ["moeviz.cli", "moeviz.__main__"]),
]

# (module, name): why the private name is used across modules. Anything else is an error.
PRIVATE_ALLOWED = {
    ("moeviz.compression.threshold_table", "_version"):
        "torch.Tensor._version, the in-place version counter: torch's only way to tell a tensor changed",
}
# torch's low-bit matmul kernels are only exposed as private aten ops (torch.ops.aten._weight_int8pack_mm, …)
PRIVATE_ALLOWED.update({("moeviz.compression.packed", op): "torch's low-bit kernels have no public name"
                        for op in ("_weight_int8pack_mm", "_weight_int4pack_mm", "_weight_int4pack_mm_for_cpu",
                                   "_convert_weight_to_int4pack", "_convert_weight_to_int4pack_for_cpu")})

PAGE_LIMIT = 250
# TODO(issue 22, item 2): slim these pages below PAGE_LIMIT (the session object); then empty this list.
PAGES_OVER_LIMIT = {"4_compress.py", "_state.py", "5_tradeoffs.py"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted((ROOT / "moeviz").rglob("*.py"))}
TREES = {m: ast.parse(p.read_text(encoding="utf-8")) for m, p in MODULES.items()}


def _imported(module: str, tree: ast.Module) -> set[str]:
    """The moeviz modules `module` imports (anywhere in the file), with the packages whose __init__ runs."""
    is_package = MODULES[module].name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]
        for name in names:
            if not name.startswith("moeviz"):
                continue
            while name not in MODULES and "." in name:
                name = name.rsplit(".", 1)[0]
            parts = name.split(".")
            # the packages on the way run their __init__ (the root package's is lazy: left out)
            for k in range(2, len(parts) + 1):
                target = ".".join(parts[:k])
                if target in MODULES and target != module and not module.startswith(target + "."):
                    found.add(target)
    return found


GRAPH = {m: _imported(m, t) for m, t in TREES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _layer(module: str) -> int:
    """The layer of `module`: its longest listed prefix (the root package "moeviz" only names itself, so a new
    top-level module must be placed in LAYERS explicitly)."""
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            inside = module == p or (p != "moeviz" and module.startswith(p + "."))
            if inside and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{module} is in no layer of tests/test_structure.py LAYERS: add it"
    return best[0]


def test_no_import_cycles():
    assert _cycles(GRAPH) == [], "import cycles among moeviz modules (break them; see docs/ARCHITECTURE.md)"


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})"
              for m, targets in sorted(GRAPH.items()) for t in sorted(targets) if _layer(t) > _layer(m)]
    assert upward == []


def _defined_here(tree: ast.Module) -> set[str]:
    """Every name this module defines or spells (functions, classes, assignments, arguments, attributes it
    sets, string constants such as a `type(...)` namespace key)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)
    return names


def _private_uses(module: str, tree: ast.Module) -> list[tuple[str, str]]:
    """(name, where) for each `_name` this module imports from moeviz, or reads as an attribute of something
    other than self / cls without defining it itself (dunders are not private)."""
    here = _defined_here(tree)
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("moeviz")):
            uses += [(a.name, f"line {node.lineno}: from {node.module} import {a.name}")
                     for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if node.attr not in here:
                uses.append((node.attr, f"line {node.lineno}: {ast.unparse(node)}"))
    return uses


def test_no_private_name_is_used_across_modules():
    bad = [f"{m} {where}" for m, tree in sorted(TREES.items()) for name, where in _private_uses(m, tree)
           if (m, name) not in PRIVATE_ALLOWED]
    assert bad == [], "private names used across modules: make them public or keep the use inside the module"


def test_private_name_check_sees_imports_and_attributes():
    tree = ast.parse("from moeviz.a import _x\nimport moeviz.b as b\nb._y()\nself._z = 1\nobj._w = 2\nobj._w\n")
    assert [n for n, _ in _private_uses("moeviz.fake", tree)] == ["_x", "_y"]


def test_every_allow_list_entry_is_still_needed():
    used = {(m, name) for m, tree in TREES.items() for name, _ in _private_uses(m, tree)}
    assert set(PRIVATE_ALLOWED) <= used, f"drop from PRIVATE_ALLOWED: {set(PRIVATE_ALLOWED) - used}"


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "pages").glob("*.py")) + ["../app.py"])
def test_pages_are_thin(page):
    lines = len((ROOT / "pages" / page).read_text(encoding="utf-8").splitlines())
    if page in PAGES_OVER_LIMIT:
        assert lines > PAGE_LIMIT, f"{page} has {lines} lines now: remove it from PAGES_OVER_LIMIT"
        pytest.xfail(f"TODO(issue 22): {page} has {lines} lines (limit {PAGE_LIMIT})")
    assert lines <= PAGE_LIMIT, f"{page} has {lines} lines; a page describes the UI and calls the library"


def test_moeviz_never_imports_streamlit():
    users = [m for m, tree in TREES.items() for node in ast.walk(tree)
             if isinstance(node, (ast.Import, ast.ImportFrom))
             and any((a.name if isinstance(node, ast.Import) else node.module or "").split(".")[0] == "streamlit"
                     for a in node.names)]
    assert users == []


def test_the_fast_lane_lists_test_files_that_exist():
    """`make test-fast` names its files in the Makefile: a renamed or deleted file must not drop out silently."""
    import re

    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    block = text.split("FAST_TESTS :=", 1)[1].split("\n\n", 1)[0]
    files = re.findall(r"tests/\S+\.py", block)
    assert len(files) >= 10 and all((ROOT / f).is_file() for f in files), files


# ---------------------------------------------------------------------------- Streamlit session keys
STATE_METHODS = {"get", "pop", "setdefault", "to_dict", "keys", "items", "values", "update", "clear",
                 "__setitem__", "__getitem__", "__contains__", "__delitem__"}


def _key_name(node: ast.AST) -> str | None:
    """A key's name: a string constant, or the constant start of an f-string followed by "*"."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return node.values[0].value + "*"
    return None


def _session_keys_used(tree: ast.Module) -> tuple[set[str], set[str]]:
    """(session keys the file reads or writes, widget keys it declares with `key=`). Session state is
    `st.session_state` or a name assigned from it (`s = st.session_state`)."""
    aliases = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
               and ast.unparse(node.value) == "st.session_state" for t in node.targets if isinstance(t, ast.Name)}
    is_state = lambda n: ast.unparse(n) == "st.session_state" or (isinstance(n, ast.Name) and n.id in aliases)  # noqa: E731
    used, widgets = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_state(node.value) and node.attr not in STATE_METHODS:
            used.add(node.attr)
        elif isinstance(node, ast.Subscript) and is_state(node.value):
            used.add(_key_name(node.slice) or "<computed>")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_state(node.func.value) \
                and node.func.attr in STATE_METHODS and node.args:
            used.add(_key_name(node.args[0]) or "<computed>")
        elif isinstance(node, ast.Compare) and any(is_state(c) for c in node.comparators):
            used.add(_key_name(node.left) or "<computed>")
        elif isinstance(node, ast.keyword) and node.arg == "key" and _key_name(node.value):
            widgets.add(_key_name(node.value))
    return used, widgets


def _declared_session_keys() -> set[str]:
    """DEFAULTS and SESSION_KEYS of pages/_state.py, read from the source."""
    tree = ast.parse((ROOT / "pages" / "_state.py").read_text(encoding="utf-8"))
    declared = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) in ("DEFAULTS", "SESSION_KEYS"):
            if isinstance(node.value, ast.Call):  # DEFAULTS = dict(key=value, ...)
                declared |= {k.arg for k in node.value.keywords}
            else:  # SESSION_KEYS = {"key": "what it holds", ...}
                declared |= {k.value for k in node.value.keys}
    return declared


def test_every_session_key_is_declared_in_state():
    """A page's session keys are declared in pages/_state.py (DEFAULTS, or SESSION_KEYS with what each holds);
    a widget's `key=` declares itself. Keys spelled as strings are checked; a key in a variable (a loop over
    DEFAULTS, over a page's widget keys) cannot be and is left out."""
    declared = _declared_session_keys()
    files = sorted((ROOT / "pages").glob("*.py")) + [ROOT / "app.py"]
    trees = {p.name: ast.parse(p.read_text(encoding="utf-8")) for p in files}
    widgets = set().union(*(_session_keys_used(t)[1] for t in trees.values()))
    known = declared | widgets
    undeclared = sorted(f"{name}: {key}" for name, tree in trees.items() for key in _session_keys_used(tree)[0]
                        if key not in known and key != "<computed>" and not any(k.endswith("*") and key.startswith(k[:-1]) for k in known))
    assert undeclared == [], "declare these session keys in pages/_state.py SESSION_KEYS (with what each holds)"


def test_session_key_finder_sees_every_spelling():
    tree = ast.parse("s = st.session_state\ns.a = 1\ns['b']\ns.get('c')\n'd' in s\nst.session_state.e\n"
                     "s.pop(f'f_{x}')\nst.slider('x', key='w')\ns.__setitem__('g', 1)\n")
    assert _session_keys_used(tree) == ({"a", "b", "c", "d", "e", "f_*", "g"}, {"w"})
