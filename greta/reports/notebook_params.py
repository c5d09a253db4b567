"""A notebook's parameters under papermill: a name its parameters cell does not declare is refused, in one line.

papermill writes its `-p` values into a cell of its own (tagged "injected-parameters", first line
"# Parameters") right after the cell tagged "parameters", and only warns about a name that cell does not
declare ("Passed unknown parameter: ctxx"): the notebook would then run with the name ignored. So every
notebook's parameters cell ends with :func:`guard_parameters`, which reads the names that cell assigns and
installs an IPython input transformer: before any later cell runs, papermill's injected cell is checked, and a
name not declared (a misspelling, a dotted key, `None` for a probe param, which would keep the file's value)
stops the notebook there with a ParamError naming it and the closest declared name in papermill's syntax
(`-p ctx 4096`), before anything runs. The papermill CLI, its Python API and JupyterLab's "Run All" of an
executed notebook all run that cell through the same kernel, so one check covers them.

:func:`papermill_syntax` turns the CLI's hints (`-p ctx=4096`) in a params error into papermill's.
"""
from __future__ import annotations

import ast
import difflib
import inspect
import linecache
import re
import shlex

from greta.record.params import DEFAULTS, ParamError, show

INJECTED_HEADER = "# Parameters"  # papermill's comment on its injected cell (translators.PythonTranslator)
_MISSING = object()


def guard_parameters() -> None:
    """Called last in a parameters cell: refuse papermill names the cell does not declare (module docstring).
    Outside IPython (the cell exec'd as plain Python) there is nothing to guard."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    caller = inspect.currentframe().f_back
    source = "".join(linecache.getlines(caller.f_code.co_filename)) if caller else ""
    if shell is None or not source:
        return
    declared = declared_parameters(source)
    transforms = shell.input_transformers_cleanup
    transforms[:] = [t for t in transforms if not isinstance(t, InjectedCellCheck)]  # "Run All" again: one
    transforms.append(InjectedCellCheck(declared))


def declared_parameters(source: str) -> dict:
    """name -> the value the parameters cell gives it (_MISSING where that is no literal), as papermill reads
    a parameters cell: its top-level assignments."""
    out = {}
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Name):
                out[t.id] = _literal(node.value)
    return out


class InjectedCellCheck:
    """An IPython input transformer (lines in, lines out) that raises on papermill's injected cell when it
    sets a name the parameters cell does not declare; every other cell passes unchanged."""

    has_side_effects = True  # keeps it out of IPython's is-this-input-complete checks

    def __init__(self, declared: dict):
        self.declared = declared

    def __call__(self, lines: list[str]) -> list[str]:
        if lines and lines[0].strip() == INJECTED_HEADER:
            check_injected("".join(lines), self.declared)
        return lines


def check_injected(source: str, declared: dict) -> None:
    """Raise a one-line ParamError for the first assignment of papermill's injected cell that the notebook
    cannot honour: a name not declared, a dotted name, or None for a probe param."""
    for name, value in _assignments(source):
        base = name.split(".", 1)[0]
        if base in declared and name != base:
            example = f"{name.split('.', 1)[1]}: {_echo(value, '...')}"
            raise ParamError(f"papermill parameter {show(name)}: papermill sets whole names, not keys inside one; "
                             f"give the mapping, e.g. -y {shlex.quote(f'{base}: {{{example}}}')}")
        if name not in declared:
            close = _closest(name, declared)
            mean = f"did you mean {papermill_arg(close, _echo(value, _example(close, declared)))}? " if close else ""
            raise ParamError(f"papermill parameter {show(name)} is not a parameter of this notebook; {mean}"
                             "(papermill --help-notebook lists them)")
        if value is None and declared[name] is None and name in DEFAULTS:
            raise ParamError(f"papermill parameter {name} None would keep the params file's value; leave it out, "
                             f"or give one, e.g. {papermill_arg(name, DEFAULTS[name])}")


def _assignments(source: str) -> list[tuple[str, object]]:
    """(target as written, its literal value or _MISSING) for each assignment of the cell; a cell that is not
    Python (papermill writes `ctx-x = 5` for -p ctx-x 5) is read line by line."""
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return [(m.group(1).strip(), _MISSING) for m in re.finditer(r"^([^#\s][^=]*?)\s*=(?!=)", source, re.M)]
    out = []
    for node in body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                out.append((ast.unparse(t), _literal(node.value)))
    return out


def _echo(value, otherwise):
    """value, to be shown back in a hint, if it is a short printable scalar; else otherwise."""
    if isinstance(value, (str, int, float)) and len(show(value)) < 60 and (
            not isinstance(value, str) or value.isprintable()):
        return value
    return otherwise


def _literal(node):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _MISSING


def _closest(name: str, declared: dict) -> str | None:
    lower = {d.lower(): d for d in declared}
    best = difflib.get_close_matches(name.lower(), list(lower), n=1, cutoff=0.0)
    return lower[best[0]] if best else None


def _example(name: str, declared: dict):
    """A value to show for name: the parameters cell's own, or the probe's default where the cell has None."""
    value = declared.get(name, _MISSING)
    return DEFAULTS[name] if (value is None or value is _MISSING) and name in DEFAULTS else value


def papermill_arg(name: str, value=_MISSING) -> str:
    """name = value as papermill's command line takes it: `-p ctx 4096`, `-p model ''`, and a mapping (one of
    its keys) or a list through `-y`."""
    if isinstance(value, dict) and value:
        k, v = next(iter(value.items()))
        return f"-y {shlex.quote(f'{name}: {{{k}: {v}}}')}"
    if isinstance(value, (dict, list)):
        return f"-y {shlex.quote(f'{name}: {value!r}')}"
    if value is _MISSING or value is None:
        return f"-p {name} <value>"
    return f"-p {name} {shlex.quote(value) if isinstance(value, str) else repr(value)}"


_CLI_HINT = re.compile(r"-p ([A-Za-z_]\w*)(\.\w+)?=(<[^>]*>|\S*)")


def papermill_syntax(message: str) -> str:
    """A params error's CLI hints (`-p ctx=4096`, `-p timeouts.decode=60`) as papermill's (`-p ctx 4096`,
    `-y 'timeouts: {decode: 60}'`); the rest of the message unchanged."""
    def one(m: re.Match) -> str:
        key, sub, value = m.group(1), m.group(2), m.group(3)
        tail = re.search(r"[;,)]*$", value).group() if not value.startswith("<") else ""
        value = value[:len(value) - len(tail)] if tail else value
        if value.endswith(".") and not value.endswith(".."):
            value, tail = value[:-1], "." + tail
        if sub:
            return f"-y {shlex.quote(f'{key}: {{{sub[1:]}: {value}}}')}{tail}"
        shown = value if value.startswith("<") or value else "''"
        return f"-p {key} {shown}{tail}"
    return _CLI_HINT.sub(one, message)
