"""Packaging: pyproject's dependencies cover what greta imports, its extras what the tests, the benches, the
scripts and the notebooks import, and environment.yml (when present) lists the same dependencies as pyproject's
[project] dependencies plus its `models` and `lab` extras (and may add its test extra), torch pinned as the
README pins it and taken from PyTorch's CPU wheel index.
(Source notebooks having no outputs is tested in tests/test_notebooks.py.)"""
from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

# import name -> distribution name, where they differ
IMPORT_TO_DIST = {"yaml": "pyyaml", "pynvml": "nvidia-ml-py", "IPython": "ipykernel", "PIL": "pillow",
                  "llama_cpp": "llama-cpp-python"}
# imported only inside try/except ImportError, for GPU backends (extras or a vendor install), real-model
# formats (the models extra), the oracle (the test extra), Ray sweeps (the ray extra) and llama.cpp (the llamacpp
# extra, a peer engine)
OPTIONAL_IMPORTS = {"triton", "pynvml", "amdsmi", "gguf", "tokenizers", "transformers", "ray", "llama_cpp"}
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


def imported_by(source: str, filename: str) -> set[str]:
    """Top-level names a Python source imports: import statements anywhere (functions, try blocks) and
    pytest.importorskip("name") calls; relative imports left out."""
    names = set()
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value.split(".")[0])
    return names


def notebook_code(path: Path) -> str:
    """A notebook's code cells as one Python source, IPython magics and shell lines left out."""
    cells = json.loads(path.read_text())["cells"]
    lines = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code").splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith(("%", "!")))


def third_party_imports(repo_root: Path, folder: str) -> dict[str, str]:
    """{top-level name: first file importing it} over a folder's .py files and notebooks, less the standard
    library and the checkout's own modules (greta, conftest, tests, sibling scripts such as bench_peers)."""
    root = repo_root / folder
    files = sorted(root.rglob("*.py")) + sorted(root.rglob("*.ipynb"))
    local = {"greta", "kernels", "tests", "bench"} | {
        f.stem for d in ("tests", "bench", "scripts") for f in (repo_root / d).rglob("*.py")}
    stdlib = sys.stdlib_module_names | {"tomllib"}  # from 3.11; tomli stands in on 3.10 (the test extra)
    found = {}
    for f in files:
        source = notebook_code(f) if f.suffix == ".ipynb" else f.read_text()
        for m in imported_by(source, str(f)):
            if m not in stdlib and m not in local:
                found.setdefault(m, str(f.relative_to(repo_root)))
    return found


def test_the_import_scan_sees_functions_try_blocks_and_importorskip():
    src = "import numpy.linalg\ndef f():\n    from PIL import Image\ntry:\n    import triton\nexcept ImportError:\n" \
          "    pass\nfrom . import x\nws = pytest.importorskip('tornado.websocket')\n"
    assert imported_by(src, "x.py") == {"numpy", "PIL", "triton", "tornado"}


def test_greta_imports_are_declared(repo_root, pyproject, project_deps):
    optional = {norm(d) for extra in pyproject["project"].get("optional-dependencies", {}).values() for d in extra}
    third_party = set(third_party_imports(repo_root, "greta"))
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


# Who runs each folder, so which extras its imports may come from: the tests are run after the README's
# `pip install -e '.[test,lab]'` (and `[llamacpp]` where it is installed: those tests skip without it); the
# benches on a GPU machine with `[gpu]` (HF transformers, from `[test]`, is
# a peer they measure); the Triton kernels with `[gpu]` (or `[test]`, under the interpreter); the notebooks and
# scripts with the dependencies alone.
FOLDER_EXTRAS = {"tests": ("test", "lab", "llamacpp"), "bench": ("gpu", "test"), "kernels": ("gpu",), "notebooks": (),
                 "scripts": ()}


@pytest.mark.parametrize("folder", sorted(FOLDER_EXTRAS))
def test_every_import_of_the_tests_benches_scripts_and_notebooks_is_declared(repo_root, pyproject, project_deps,
                                                                             folder):
    extras = pyproject["project"]["optional-dependencies"]
    declared = project_deps | {norm(d) for name in FOLDER_EXTRAS[folder] for d in extras[name]}
    found = third_party_imports(repo_root, folder)
    assert found, f"the scan found no import in {folder}/"
    undeclared = {m: f for m, f in found.items() if norm(IMPORT_TO_DIST.get(m, m)) not in declared}
    assert not undeclared, (f"imported in {folder}/ but declared neither in pyproject's dependencies nor in its "
                            f"{' / '.join(FOLDER_EXTRAS[folder]) or 'no'} extras: {undeclared}")


def test_llama_cpp_is_its_own_extra_not_the_test_extra(pyproject):
    """llama-cpp-python compiles llama.cpp at install time (no wheel on PyPI): CI's test extra must not pull it."""
    extras = pyproject["project"]["optional-dependencies"]
    assert [norm(d) for d in extras["llamacpp"]] == ["llama-cpp-python"]
    assert "llama-cpp-python" not in {norm(d) for d in extras["test"]}


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


def torch_pins(text: str) -> set[str]:
    return set(re.findall(r"\btorch==([0-9][0-9A-Za-z.+]*)", text))


def test_torch_is_pinned_once_and_cpu_only_in_environment_yml(repo_root):
    """One torch pin across the README's commands, CI and environment.yml; environment.yml, which does not
    run here, reads PyTorch's CPU wheel index so that pip takes the +cpu build and not PyPI's CUDA one."""
    readme = (repo_root / "README.md").read_text()
    env_text = (repo_root / "environment.yml").read_text()
    pins = {f: torch_pins((repo_root / f).read_text()) for f in ("README.md", ".ci/run", "environment.yml")
            if (repo_root / f).is_file()}
    assert len(pins["README.md"]) == 1, f"the README pins torch as {pins['README.md']}: one version, please"
    assert all(p == pins["README.md"] for p in pins.values()), f"torch pins differ: {pins}"
    pip = next(d["pip"] for d in yaml.safe_load(env_text)["dependencies"] if isinstance(d, dict))
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in pip
    assert "download.pytorch.org/whl/cpu" in readme  # the README says how a CPU-only machine gets the CPU build
