"""The top-level kernels/ folder (the design card's) does not shadow the PyPI package `kernels`.

`python -m pytest`, `python -m greta`, `python -c` and a notebook kernel started at the checkout's root all put
the root on sys.path, where kernels/ would be found first; transformers imports the PyPI package. Each check
runs in a fresh interpreter whose working directory is the root, as a user's would be."""
import importlib.util
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def run_at_root(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)


def installed_kernels_origin() -> str | None:
    """Where `import kernels` leads from outside the checkout (None: nothing of that name installed)."""
    out = subprocess.run([sys.executable, "-c", "import importlib.util as u; s = u.find_spec('kernels');"
                          " print(s.origin if s else '')"], cwd="/", capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or None


def test_import_kernels_at_the_root_reaches_the_installed_package():
    origin = installed_kernels_origin()
    r = run_at_root("import kernels, greta.kernels as g; print(kernels.__file__); print(g.__file__)")
    if origin is None:
        assert "ModuleNotFoundError: No module named 'kernels'" in r.stderr, r.stderr
        return
    assert r.returncode == 0, r.stderr
    theirs, ours = r.stdout.split()
    assert theirs == origin, "import kernels at the root found the checkout's folder, not the installed package"
    assert ours == str(REPO_ROOT / "kernels" / "__init__.py"), "greta.kernels must stay Greta's"


def test_greta_kernels_is_still_greta_after_import_kernels():
    r = run_at_root("import kernels\nfrom greta import kernels as g\nprint(callable(g.matmul_ref))")
    if installed_kernels_origin() is None:
        pytest.skip("no package named kernels installed here")
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr


def test_without_an_installed_package_import_kernels_fails_as_elsewhere():
    """-S drops site-packages: with nothing installed under the name, the folder must not pose as the package."""
    r = run_at_root(f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); import kernels", "-S")
    assert "ModuleNotFoundError: No module named 'kernels'" in r.stderr, r.stderr


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
def test_transformers_llama_and_gguf_paths_import_at_the_root():
    """What broke test_oracle, test_gguf and test_checkpoints, and `greta oracle` run from the root."""
    r = run_at_root("from transformers import LlamaForCausalLM, LlamaConfig\n"
                    "from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint\n"
                    "import transformers.integrations.hub_kernels\n"
                    "print('ok')")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_python_m_greta_at_the_root_with_kernels_imported_first():
    r = run_at_root("import runpy, sys, kernels; sys.argv = ['greta', '--help']; runpy.run_module('greta', "
                    "run_name='__main__')")
    assert r.returncode == 0 and "audit" in r.stdout, r.stderr[-2000:]
