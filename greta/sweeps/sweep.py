"""Sweeps: one B3.77 probe record per point of a declared matrix (ctx x kv_aligned x seed x dtype).

    sweep_dir = run_sweep("params/b3_76.yaml", {"gen": 64}, out_root="outputs")

A **matrix file** (greta.record.matrix) is a params YAML in which the axis keys ``ctx``, ``kv_aligned``,
``seed`` and ``dtype`` may be lists (a scalar is a one-value axis). Every other key is a base param shared
by all points. An optional ``point_overrides`` list sets params on some points only::

    point_overrides:
      - when: {ctx: 16384}                     # axis values the point must have
        set: {timeouts: {prefill: 1200}}       # params for those points

Every point's params are validated through the one params validator and preflighted on this machine
(greta.probe.preflight) before anything runs, so a bad matrix stops in one line (ParamError).

Layout (docs/RECORD.md)::

    <out_root>/<YYYY-MM-DD>/<probe>-sweep/<sweep-id>/
        config.json          the declared matrix (axes, base params, point_overrides, point names), written
                             atomically before the first point
        points/<point>/      one probe record per point, e.g. points/ctx4096-kv1-seed0-bfloat16/
        points/<point>.incomplete-<k>/   an incomplete record moved aside on resume (never deleted)
        sweep_log.jsonl      one line per point attempt: skipped / ran (verdict) / error
        point_logs/<point>.log   a parallel sweep's (--gpus N) point process output
        sweep_report.ipynb, sweep_report.html, *.png   the aggregate report (notebooks/sweep_report.ipynb)
        sweep_verdict.json   PASS_GUARDRAIL | FAIL_GUARDRAIL | INCOMPLETE, with reasons

A point is **complete** when its record verifies strictly
(``greta.checks.verify.verify(dir, allow_missing_large=False) == []``: sealed manifest, hashes, phases, logits
re-checked) and its verdict is not INTERRUPTED. A fault verdict (FAIL_OOM at the largest ctx, FAIL_TIMEOUT,
...) is a complete result: the sweep carries on to the next point, and a resume does not rerun it.

Resume: pass the existing sweep directory. Complete points are skipped; an incomplete point directory (a
killed run, a damaged record) is moved aside to ``points/<name>.incomplete-<k>/`` and the point is rerun.
A resume whose declared matrix differs from config.json is refused (:class:`SweepError`, one line).

Concurrency: ``run_sweep(..., gpus=N)`` (``greta sweep --gpus N``) runs the points concurrently, each in its own
process on its own group of ``tp`` of N GPUs (greta.sweeps.parallel); ``executor="ray"`` (``--executor ray``)
runs each point as a Ray task on a cluster (greta.sweeps.ray_executor, docs/SWEEPS.md). The records, resume and
guardrail rules are the same.
"""
from __future__ import annotations

import json
from pathlib import Path

from greta.paths import record_value
from greta.record.matrix import AXES, Matrix, load_matrix, matrix_from_data, point_name
from greta.record.params import ParamError
from greta.terminal import brief
from greta.sweeps.layout import (CONFIG, VERDICT, SweepError, log_entry, point_complete, points, read_config, say,
                                 verdict_of)

__all__ = ["AXES", "VERDICT", "SweepError", "load_matrix", "load_checked_matrix", "points", "point_name", "point_complete", "run_sweep",
           "read_config", "matrix_from_config"]

def matrix_from_config(cfg: dict, overrides: dict | None = None) -> Matrix:
    """Re-validate the matrix a config.json declares (a resume without the matrix file)."""
    data = {**cfg["base"], **cfg["axes"], "point_overrides": cfg.get("point_overrides", [])}
    return matrix_from_data(data, CONFIG, overrides, file=cfg.get("matrix_file"))


def load_checked_matrix(matrix_file, overrides: dict | None, cfg: dict | None = None) -> Matrix:
    """The matrix (from its file, else from a resumed sweep's config.json), every point preflighted on this
    machine before anything runs (a model that isn't there, a point that cannot fit)."""
    from greta.probe.preflight import preflight

    matrix = load_matrix(matrix_file, overrides) if matrix_file or cfg is None else matrix_from_config(cfg, overrides)
    for name, params in matrix.params.items():
        try:
            preflight(params)
        except ParamError as e:
            raise ParamError(f"matrix {matrix.file or CONFIG}, point {name}: {e}") from None
    return matrix


def _sweep_name_parts(matrix: Matrix) -> list[str]:
    """<model>-<matrix file stem>: greta.record.rundir adds the time before and a random suffix after."""
    model = Path(matrix.points()[0].model).name or "model"
    return [model, Path(matrix.file).stem if matrix.file else "matrix"]


def _move_aside(d: Path) -> Path:
    k = 1
    while (d.parent / f"{d.name}.incomplete-{k}").exists():
        k += 1
    dest = d.parent / f"{d.name}.incomplete-{k}"
    d.rename(dest)
    return dest


def run_sweep(matrix_file=None, overrides: dict | None = None, out_root="outputs", sweep_dir=None,
              progress: bool = True, report: bool = True, gpus: int | None = None, executor: str = "local",
              address: str | None = None) -> Path:
    """Run (or resume, with ``sweep_dir``) every point of the matrix; return the sweep directory.

    Without ``matrix_file`` a resume takes the matrix from the sweep's config.json. A point that fails
    is a result; the sweep goes on. Ctrl-C / SIGTERM stops the sweep (the point's record says
    INTERRUPTED; a resume reruns it). With ``report``, the aggregate report is executed and
    sweep_verdict.json written at the end (greta.sweeps.report.finish).

    ``gpus`` None: the points run one after another in this process. ``gpus`` N: they run concurrently, each
    in its own process on its own group of ``tp`` of N GPUs (slots on the CPU): greta.sweeps.parallel.
    ``executor`` "ray": each point a Ray task on the cluster at ``address`` (None: a local one started here),
    greta.sweeps.ray_executor; the same point processes, records and rules.
    """
    matrix, sweep_dir, runner = _open_sweep(matrix_file, overrides, out_root, sweep_dir, (gpus, executor, address))
    todo, total = _pending(matrix, sweep_dir, progress)
    if runner is None:
        _run_serial(matrix, sweep_dir, todo, total, progress)
    else:
        from greta.sweeps.parallel import run_parallel

        run_parallel(matrix, sweep_dir, todo, total, runner, progress)
    if report:
        from greta.sweeps.report import finish

        finish(sweep_dir, progress=progress)
    return sweep_dir


def _open_sweep(matrix_file, overrides, out_root, sweep_dir, how) -> tuple[Matrix, Path, object | None]:
    """(matrix, sweep dir, the executor or None for a serial sweep): a resumed sweep's, checked against its
    config.json, or a new one, its config.json written. Every check (the matrix, --gpus, the cluster) runs
    before a new directory exists. how: (gpus, executor name, address)."""
    from greta.record.rundir import allocate_run_dir
    from greta.record.store import _now, atomic_write_text, git_state, preflight

    if sweep_dir is not None:
        sweep_dir = Path(sweep_dir)
        cfg = read_config(sweep_dir)
        matrix = load_checked_matrix(matrix_file, overrides, cfg)
        declared = json.loads(json.dumps(matrix.declared()))
        diff = [k for k in ("axes", "base", "point_overrides") if cfg.get(k) != declared[k]]
        if diff:
            detail = "; ".join(f"{k}: config.json {cfg.get(k)} vs now {declared[k]}" for k in diff)
            raise SweepError(f"refusing to resume {sweep_dir}: the declared matrix differs ({detail[:400]}); "
                             "start a new sweep instead")
        return matrix, sweep_dir, _executor(matrix, *how)
    matrix = load_checked_matrix(matrix_file, overrides)
    runner = _executor(matrix, *how)
    first = matrix.points()[0]
    preflight(out_root, first)
    sweep_dir = allocate_run_dir(out_root, f"{first.probe}-sweep", _sweep_name_parts(matrix))
    cfg = {"format": 1, "sweep_id": sweep_dir.name, "matrix_file": record_value(matrix.file, sweep_dir),
           "created_utc": _now(), **git_state(), **matrix.declared(), "points": [p["name"] for p in points(matrix.axes)]}
    atomic_write_text(sweep_dir / CONFIG, json.dumps(cfg, indent=2, default=str) + "\n")
    return matrix, sweep_dir, runner


def _executor(matrix: Matrix, gpus, executor: str, address: str | None):
    """The executor the points run on (None: one after another in this process); ParamError (one line) for a
    bad combination or a cluster that cannot run some point."""
    if executor == "ray":
        if gpus is not None:
            raise ParamError(f"--gpus {gpus} with --executor ray: the Ray cluster's resources decide how many "
                             "points run at once; leave --gpus out")
        from greta.sweeps.ray_executor import RayExecutor

        return RayExecutor.connect(matrix, address)
    if executor != "local":
        raise ParamError(f"--executor {executor!r}: use local (this machine) or ray (a Ray cluster)")
    if address is not None:
        raise ParamError(f"--address {address!r} needs --executor ray")
    if gpus is None:
        return None
    from greta.sweeps.parallel import LocalExecutor, pool_ids

    return LocalExecutor(pool_ids(matrix, gpus))


def _pending(matrix: Matrix, sweep_dir: Path, progress: bool) -> tuple[list[tuple[int, dict]], int]:
    """([(number, point)] still to run, number of points): complete points are skipped, an incomplete point
    directory is moved aside (resume); both are logged."""
    pdir = sweep_dir / "points"
    pdir.mkdir(exist_ok=True)
    every = points(matrix.axes)
    todo = []
    for i, pt in enumerate(every, 1):
        name, d = pt["name"], pdir / pt["name"]
        if d.exists():
            ok, reasons = point_complete(d)
            if ok:
                say(progress, f"[{i}/{len(every)}] {name}: complete, skipped")
                log_entry(sweep_dir, point=name, action="skipped")
                continue
            aside = _move_aside(d)
            say(progress, f"[{i}/{len(every)}] {name}: incomplete ({reasons[0]}); moved to {aside.name}, rerunning")
            log_entry(sweep_dir, point=name, action="moved_aside", to=aside.name, reasons=reasons)
        todo.append((i, pt))
    return todo, len(every)


def _run_serial(matrix: Matrix, sweep_dir: Path, todo, total: int, progress: bool) -> None:
    """Each point in this process, one after another (an interrupt stops the sweep: ProbeInterrupted)."""
    from greta.probe.runner import run_probe
    from greta.record.store import RecordError

    for i, pt in todo:
        name, d = pt["name"], sweep_dir / "points" / pt["name"]
        say(progress, f"[{i}/{total}] {name}: running")
        try:
            run_probe(matrix.params[name], run_dir=d, progress=progress)
        except RecordError:
            raise  # an unwritable/full output folder fails every later point too
        except Exception as e:  # noqa: BLE001 - one broken point must not stop the sweep
            msg = brief(f"{type(e).__name__}: {e}")
            say(progress, f"[{i}/{total}] {name}: error: {msg}")
            log_entry(sweep_dir, point=name, action="error", error=msg)
            continue
        verdict, reason = verdict_of(d)
        say(progress, f"[{i}/{total}] {name}: {verdict}")
        log_entry(sweep_dir, point=name, action="ran", verdict=verdict, reason=reason)
