"""Where the checkout's folders are: the notebooks, params and outputs ship beside the package, not in it."""
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
