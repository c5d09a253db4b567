"""The layout's rules (docs/ARCHITECTURE.md), read from the source: layers import only downward, no
import circles, no function longer than a screen."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# lowest first; a module may import its own layer and the layers before it, never a later one
# reports renders data it is given (Markdown, plots, HTML): the probe, checks and sweeps call it, never the reverse
LAYERS = ["paths", "terminal", "kernels", "engine", "record", "reports", "probe", "checks", "sweeps", "audit", "cli"]
MAX_FUNCTION_LINES = 80
# the probe registry: the only code that may tell probe kinds apart by name (docs/ARCHITECTURE.md)
REGISTRY = ("greta/probe/kinds/", "greta/record/kinds.py")
KIND_NAMES = ("b3_77", "batch")
KIND_TEST = re.compile(r"""\bprobe\b\W{0,4}\s*[!=]=|[!=]=\s*["'](?:%s)["']|["'](?:%s)["']\s*[!=]=""" % (("|".join(KIND_NAMES),) * 2))


def _sources() -> dict[str, Path]:
    """greta module name -> file, with kernels/ as greta.kernels."""
    out = {}
    for p in sorted((ROOT / "greta").rglob("*.py")):
        rel = p.relative_to(ROOT / "greta").with_suffix("")
        out[".".join(("greta", *rel.parts)).removesuffix(".__init__")] = p
    for p in sorted((ROOT / "kernels").glob("*.py")):
        out[f"greta.kernels.{p.stem}".removesuffix(".__init__")] = p
    return out


def _layer(module: str) -> int:
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "cli"
    if name in ("__main__", "__init__") or len(parts) == 1:
        name = "cli"
    return LAYERS.index(name)


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Every greta module that `module` imports, at any depth of the file (lazy imports count too)."""
    tree = ast.parse(path.read_text())
    pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n and n != module:
                found.add(n)
    return found


def _graph() -> dict[str, set[str]]:
    src = _sources()
    known = set(src)
    return {m: _imports(m, p, known) for m, p in src.items()}


def test_layers_import_only_downward():
    up = [f"{m} -> {d}" for m, deps in _graph().items() for d in deps
          if d != "greta" and _layer(d) > _layer(m)]
    assert not up, "imports that run back up the layers:\n" + "\n".join(sorted(up))


def test_no_import_circles():
    g = {m: {d for d in deps if d != "greta" and not m.startswith(d + ".")} for m, deps in _graph().items()}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_functions_fit_on_a_screen():
    long = []
    for m, p in _sources().items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule can fail: an engine module importing the probe is caught."""
    f = tmp_path / "model.py"
    f.write_text("from greta.probe.runner import run_probe\n")
    assert "greta.probe.runner" in _imports("greta.engine.model", f, {"greta.probe.runner", "greta.engine.model"})
    assert _layer("greta.probe.runner") > _layer("greta.engine.model")


def _kind_tests(rel: str, text: str) -> list[str]:
    if rel.startswith(REGISTRY):
        return []
    return [f"{rel}:{i} {ln.strip()}" for i, ln in enumerate(text.splitlines(), 1) if KIND_TEST.search(ln)]


def test_only_the_registry_tells_probe_kinds_apart():
    """No `probe == "…"` (or a kind's name compared) outside greta.probe.kinds / greta.record.kinds: a probe
    kind's differences are its ProbeKind's, so a new kind is one module, not a string test in every file."""
    found = [hit for p in sorted((ROOT / "greta").rglob("*.py"))
             for hit in _kind_tests(str(p.relative_to(ROOT)), p.read_text())]
    assert not found, "probe kinds told apart outside the registry:\n" + "\n".join(found)


def test_the_checker_sees_a_kind_test():
    """The rule can fail: each way of testing a kind by name is caught, outside the registry only."""
    for line in ('if params["probe"] == "batch":', "if p.probe != 'b3_77':", 'x = r.get("probe") == "batch"',
                 'if kind == "batch":', "'b3_77' != name"):
        assert _kind_tests("greta/audit.py", line), line
        assert not _kind_tests("greta/probe/kinds/batch.py", line)
    assert not _kind_tests("greta/audit.py", 'kind = kind_of(params)  # probe kinds: greta.probe.kinds')


def _subscriptable(obj) -> bool:
    try:
        obj["ctx"]
    except TypeError:
        return False
    except KeyError:
        return True
    return True


def test_live_params_and_matrices_are_read_by_attribute_only():
    """One way to read a run's values: Params, its sections and a Matrix have attributes and no dict-style
    access (params["ctx"]); a dict is what a record's params.json is read into, and only JSON readers hold one."""
    from greta.record.matrix import load_matrix
    from greta.record.params import Params

    params = Params()
    for obj in (params, params.timeouts, params.thresholds, load_matrix(None)):
        assert not _subscriptable(obj), f"{type(obj).__name__} is subscriptable again: read its attributes instead"
        assert not hasattr(obj, "get"), f"{type(obj).__name__} has a dict-style get: read its attributes instead"
    assert _subscriptable(params.to_dict()) and _subscriptable({})  # the check can fail: a dict is subscriptable
