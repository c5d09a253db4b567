"""Execute the analysis notebooks of a run directory and render them to HTML.

The notebooks themselves (``notebooks/*.ipynb``) are thin: they read one run
directory (docs/RECORD.md) and call :mod:`greta.reports.plots`. They ship with the
repository checkout, not inside the installed package.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["NOTEBOOK_DIR", "REPO_ROOT", "ANALYSIS_NOTEBOOKS", "NotebooksMissing",
           "notebook_path", "execute_notebook", "execute_analysis", "to_html"]

from greta.paths import NOTEBOOK_DIR, REPO_ROOT
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

    The run notebook runs the probe and the two analysis notebooks. If its kernel dies mid-probe (or the
    audit is interrupted), the record still gets a FAIL_ERROR (INTERRUPTED) verdict.json, the phases and
    VRAM samples measured up to then, and a report.md saying so. The record is sealed (manifest.json) last.
    """
    from datetime import datetime, timezone

    from greta.probe.preflight import preflight as preflight_params
    from greta.record.params import load_params, resolve
    from greta.record.store import preflight, run_id, seal

    params = preflight_params(load_params(params_file, overrides))  # bad input stops here, in one line
    preflight(out_root, params)
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    run_dir = (Path(out_root) / day / params["probe"] / run_id(params)).resolve()
    run_dir.mkdir(parents=True)
    out = run_dir / "run_b3_77.ipynb"
    interrupted = None
    try:
        err = execute_notebook(notebook_path("run_b3_77.ipynb"), out,
                               dict(params_file=str(resolve(params_file).resolve()), overrides=dict(overrides),
                                    out_root=str(Path(out_root).resolve()), run_dir=str(run_dir)), timeout_s=None)
    except KeyboardInterrupt:
        err, interrupted = None, "SIGINT (Ctrl-C)"
    if err is not None:
        print(f"greta: run_b3_77.ipynb failed: {_one_line(err)} (kept: {out})", file=sys.stderr)
    if not (run_dir / "verdict.json").is_file():
        if interrupted:
            status, how = "interrupted", f"the audit was interrupted by {interrupted}"
        else:
            status, how = "crash", f"the notebook kernel died ({_one_line(err) if err else 'no error reported'})"
        _fault_record(run_dir, params, status, how)
    if out.is_file():
        try:
            to_html(out)
        except Exception as exc:  # noqa: BLE001 - the record stands without its HTML
            print(f"greta: rendering {out.name} to HTML failed: {_one_line(exc)}", file=sys.stderr)
    seal(run_dir, params)
    if interrupted:
        from greta.probe.runner import ProbeInterrupted

        raise ProbeInterrupted(run_dir, interrupted)
    return run_dir


def _fault_record(run_dir: Path, params: dict, status: str, how: str):
    """The record of a run whose probe process died before writing its own: what it had checkpointed
    (perf.json, vram_samples.csv), the phase it was in, a verdict, a vram.json and report.md, and a
    banner on the partial notebook (papermill marks the unrun cells as if they had completed).
    status: the failed phase's status, "crash" (verdict FAIL_ERROR) or "interrupted" (INTERRUPTED)."""
    import json

    from greta.probe import vram
    from greta.engine.source import load_config
    from greta.record.metrics import FAIL
    from greta.record.params import PHASES
    from greta.record.store import Record, atomic_write_text, verdict_record

    verdict = FAIL[status]
    rec = Record(run_dir, params)  # writes files only: Record.create would run the preflight and start afresh
    if not (run_dir / "params.json").is_file():  # died before the probe made its record
        from greta.record.store import git_state, versions

        rec.write_json("params.json", params)
        rec.write_json("metadata.json", {"run_id": run_dir.name, "probe": params["probe"], **git_state(),
                                         "versions": versions(), "seed": params["seed"], "model": params["model"]})
    perf_path = run_dir / "perf.json"
    perf = json.loads(perf_path.read_text()) if perf_path.is_file() else {}
    perf = {ph: perf.get(ph, {"status": "not_run"}) for ph in PHASES}
    running = [ph for ph in PHASES if perf[ph].get("status") == "running"]
    failed = running[0] if running else None
    reason = f"{how}" + (f" during {failed}" if failed else " before the probe started")
    if failed:
        perf[failed].update({"status": status, "error": reason})
    rec.write_json("perf.json", perf)
    csv_path = run_dir / "vram_samples.csv"
    if csv_path.is_file():
        samples = vram.read_samples_csv(csv_path)
    else:
        samples = []
        vram.write_samples_csv(csv_path, samples)
    try:
        floor = vram.floor_for(params, load_config(params["model"]))
    except Exception:  # noqa: BLE001 - an unreadable model config leaves the floor unknown
        floor = {"weights_mb": None, "kv_cache_mb": None, "total_mb": None}
    vs = vram.summary(samples, {}, floor, loaded=perf["load"].get("status") == "ok", period_s=params["sampling_period_s"],
                      fallback_reason="the probe process died before writing vram.json; figures from its samples")
    peak = vs["peak_vram_mb"]
    rec.write_json("vram.json", vs)
    rec.write_json("verdict.json", verdict_record(params, verdict, reason, failed))
    rows = "\n".join(f"| {ph} | {perf[ph].get('status')} | {perf[ph].get('wall_s', '')} |" for ph in PHASES)
    atomic_write_text(run_dir / "report.md", f"# B3.77 — {verdict}\n\n{reason}.\n\n| Phase | Status | Wall (s) |\n"
                      f"|---|---|---|\n{rows}\n\nVRAM samples up to the fault: {len(samples)} (peak {peak} MB; "
                      f"floor {floor['total_mb']} MB). See run_b3_77.ipynb/.html here: cells after the fault did not run.\n")
    nb_path = run_dir / "run_b3_77.ipynb"
    if nb_path.is_file():
        import nbformat

        nb = nbformat.read(nb_path, as_version=4)
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(
            f"# ⚠ {verdict}: {reason}\n\nThe cells below this point did not run to completion, whatever their "
            "execution marks say. The record's verdict.json, perf.json and report.md say what happened."))
        nbformat.write(nb, nb_path)
