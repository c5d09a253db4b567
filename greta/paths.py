"""Where the checkout's folders are: the notebooks, params and outputs ship beside the package, not in it."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
OUTPUTS = REPO_ROOT / "outputs"
