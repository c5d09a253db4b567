"""Packaging: pyproject's dependencies cover what greta imports, and environment.yml (when present) lists
the same dependencies as pyproject's [project] dependencies plus its `models` extra (and may add its test extra).
(Source notebooks having no outputs is tested in tests/test_notebooks.py.)"""
from __future__ import annotations

import ast
import re
import sys

import pytest
import yaml

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

# import name -> distribution name, where they differ
IMPORT_TO_DIST = {"yaml": "pyyaml", "pynvml": "nvidia-ml-py", "IPython": "ipykernel", "PIL": "pillow"}
# imported only inside try/except ImportError, for GPU backends (extras or a vendor install), real-model
# formats (the models extra) and the oracle (the test extra)
OPTIONAL_IMPORTS = {"triton", "pynvml", "amdsmi", "gguf", "tokenizers", "transformers"}
# conda package name -> PyPI name, where they differ
CONDA_TO_PYPI = {"pytorch": "torch"}


def norm(spec: str) -> str:
    """A requirement's bare, normalized name: 'numpy>=1.26' -> 'numpy', 'conda-forge::PyYAML=6' -> 'pyyaml'."""
    spec = spec.split("::")[-1].strip()
    name = re.split(r"[<>=!~;\[\s@]", spec, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def test_norm():
    assert norm("numpy>=1.26") == "numpy"
    assert norm("torch==2.4.0+cpu") == "torch"
    assert norm("conda-forge::PyYAML=6.0") == "pyyaml"
    assert norm("nvidia_ml_py >= 12") == "nvidia-ml-py"
    assert norm("safetensors") == "safetensors"
    assert norm("tqdm[notebook]>=4") == "tqdm"


@pytest.fixture(scope="module")
def pyproject(repo_root):
    return tomllib.loads((repo_root / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def project_deps(pyproject) -> set[str]:
    return {norm(d) for d in pyproject["project"]["dependencies"]}


def test_greta_imports_are_declared(repo_root, pyproject, project_deps):
    optional = {norm(d) for extra in pyproject["project"].get("optional-dependencies", {}).values() for d in extra}
    imported = set()
    for f in sorted((repo_root / "greta").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "greta"}
    assert {"torch", "numpy", "yaml"} <= third_party  # the scan works
    undeclared = []
    for m in sorted(third_party):
        dist = norm(IMPORT_TO_DIST.get(m, m))
        if dist in project_deps:
            continue
        if m in OPTIONAL_IMPORTS and (dist in optional or m == "amdsmi"):
            continue
        undeclared.append(m)
    assert not undeclared, f"imported by greta/ but not in pyproject dependencies: {undeclared}"


def test_console_script_points_at_main(pyproject):
    import importlib

    target = pyproject["project"]["scripts"]["greta"]
    module, _, attr = target.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


def env_names(env: dict) -> set[str]:
    """Normalized package names of a conda environment file, its pip: section included (python, pip and
    local installs such as `-e .` left out)."""
    names = set()
    for dep in env.get("dependencies", []):
        if isinstance(dep, dict):
            names |= {norm(p) for p in dep.get("pip", []) if not p.strip().startswith(("-", ".", "/"))}
        else:
            n = norm(str(dep))
            names.add(CONDA_TO_PYPI.get(n, n))
    return names - {"python", "pip", "greta"}


def test_env_names_parses_a_conda_file():
    env = yaml.safe_load("""
name: greta
channels: [conda-forge]
dependencies:
  - python=3.11
  - pip
  - numpy>=1.26
  - conda-forge::pyyaml
  - pip:
      - torch==2.4.0
      - nvidia_ml_py
      - -e .
""")
    assert env_names(env) == {"numpy", "pyyaml", "torch", "nvidia-ml-py"}


def test_environment_yml_matches_pyproject(repo_root, pyproject, project_deps):
    path = repo_root / "environment.yml"
    if not path.is_file():
        pytest.skip("environment.yml not present")
    listed = env_names(yaml.safe_load(path.read_text()))
    extras = pyproject["project"]["optional-dependencies"]
    want = project_deps | {norm(d) for d in extras["models"] + extras["lab"]}  # JupyterLab comes with conda too
    test_extra = {norm(d) for d in pyproject["project"]["optional-dependencies"].get("test", [])}
    assert want - listed == set(), f"in pyproject (dependencies + models and lab extras) but not in environment.yml: {sorted(want - listed)}"
    extra = listed - want - test_extra
    assert extra == set(), \
        f"in environment.yml but not in pyproject [project] dependencies, the models extra or the test extra: {sorted(extra)}"
