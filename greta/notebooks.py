"""Execute the analysis notebooks of a run directory and render them to HTML.

The notebooks themselves (``notebooks/*.ipynb``) are thin: they read one run
directory (docs/RECORD.md) and call :mod:`greta.plots`. They ship with the
repository checkout, not inside the installed package.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["NOTEBOOK_DIR", "REPO_ROOT", "ANALYSIS_NOTEBOOKS", "NotebooksMissing",
           "notebook_path", "execute_notebook", "execute_analysis", "to_html"]

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
ANALYSIS_NOTEBOOKS = ("vram_plot.ipynb", "equivalence_analysis.ipynb")
KERNEL = "python3"


class NotebooksMissing(FileNotFoundError):
    """The notebooks/ folder is not where the package expects it."""


def notebook_path(name: str) -> Path:
    """``NOTEBOOK_DIR / name``; a one-line error if the folder isn't there."""
    if not NOTEBOOK_DIR.is_dir():
        raise NotebooksMissing(
            f"{NOTEBOOK_DIR} not found: the notebooks ship with the repository checkout "
            "(install greta editable from a clone: pip install -e .)")
    path = NOTEBOOK_DIR / name
    if not path.is_file():
        raise NotebooksMissing(f"{path} not found in the repository checkout")
    return path


def to_html(ipynb_path: str | Path) -> Path:
    """Render a notebook to ``<same name>.html`` beside it, images embedded."""
    from nbconvert import HTMLExporter

    ipynb_path = Path(ipynb_path)
    exporter = HTMLExporter()
    exporter.embed_images = True  # markdown-referenced images; outputs are inline already
    body, _resources = exporter.from_filename(str(ipynb_path))
    out = ipynb_path.with_suffix(".html")
    out.write_text(body, encoding="utf-8")
    return out


def execute_notebook(src: str | Path, out: str | Path, parameters: dict,
                     timeout_s: float | None = 600) -> Exception | None:
    """Run ``src`` with papermill into ``out`` (cwd: the repo root).

    Returns the exception instead of raising: papermill has already written the
    partially executed notebook (with the error output) to ``out`` by then.
    ``timeout_s`` bounds each cell, so a hung kernel cannot hang the caller.
    """
    import papermill as pm

    try:
        pm.execute_notebook(
            str(src), str(out),
            parameters=parameters,
            kernel_name=KERNEL,
            progress_bar=False,
            cwd=str(REPO_ROOT),
            execution_timeout=timeout_s,
        )
    except Exception as exc:  # noqa: BLE001 - the caller must never abort on a notebook
        return exc
    return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # papermill's PapermillExecutionError: the last lines name the real error
    tail = [ln for ln in text if ln.strip()][-1:] if text else []
    return f"{type(exc).__name__}: {tail[0] if tail else ''}"[:300]


def execute_analysis(run_dir: str | Path, timeout_s: float | None = 600) -> list[Path]:
    """Execute the VRAM and equivalence notebooks into ``run_dir``, plus HTML of each.

    A notebook that fails is still kept (papermill writes it with the error) and
    still rendered; the failure is reported on stderr and the next notebook runs.
    Returns the paths written: ``<nb>.ipynb`` and ``<nb>.html`` for each notebook.
    Only a missing ``notebooks/`` folder raises (:class:`NotebooksMissing`).
    """
    run_dir = Path(run_dir).resolve()  # the kernel's cwd is the repo root, not ours
    sources = [notebook_path(name) for name in ANALYSIS_NOTEBOOKS]
    written: list[Path] = []
    for src in sources:
        out = run_dir / src.name
        err = execute_notebook(src, out, dict(run_dir=str(run_dir)), timeout_s=timeout_s)
        if err is not None:
            print(f"greta: {src.name} failed: {_one_line(err)} (kept: {out})", file=sys.stderr)
        if not out.is_file():
            continue
        written.append(out)
        try:
            written.append(to_html(out))
        except Exception as exc:  # noqa: BLE001
            print(f"greta: rendering {out.name} to HTML failed: {_one_line(exc)}",
                  file=sys.stderr)
    return written


def run_audit(params_file, overrides: dict, out_root="outputs") -> Path:
    """The main job: execute run_b3_77.ipynb into a fresh record directory and render it to HTML.

    The run notebook runs the probe and the two analysis notebooks. If its kernel dies mid-probe, the
    record still gets a FAIL_CRASH verdict.json and a report.md saying so.
    """
    import json

    from .params import load_params, resolve
    from datetime import datetime, timezone

    params = load_params(params_file, overrides)  # bad input stops here, in one line
    from .record import run_id

    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    run_dir = (Path(out_root) / day / params["probe"] / run_id(params)).resolve()
    run_dir.mkdir(parents=True)
    out = run_dir / "run_b3_77.ipynb"
    err = execute_notebook(notebook_path("run_b3_77.ipynb"), out,
                           dict(params_file=str(resolve(params_file).resolve()), overrides=dict(overrides),
                                out_root=str(Path(out_root).resolve()), run_dir=str(run_dir)), timeout_s=None)
    if err is not None:
        print(f"greta: run_b3_77.ipynb failed: {_one_line(err)} (kept: {out})", file=sys.stderr)
    if not (run_dir / "verdict.json").is_file():
        reason = f"the run notebook stopped before the probe wrote its verdict: {_one_line(err) if err else 'unknown'}"
        (run_dir / "verdict.json").write_text(json.dumps(
            {"verdict": "FAIL_CRASH", "reason": reason, "failed_phase": None, "bit_exact": None,
             "kv_aligned": params["kv_aligned"]}, indent=2) + "\n")
        (run_dir / "report.md").write_text(f"# B3.77 — FAIL_CRASH\n\n{reason}\n\nSee run_b3_77.ipynb/.html here.\n")
    if out.is_file():
        try:
            to_html(out)
        except Exception as exc:  # noqa: BLE001 - the record stands without its HTML
            print(f"greta: rendering {out.name} to HTML failed: {_one_line(exc)}", file=sys.stderr)
    return run_dir
