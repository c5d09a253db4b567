"""Sweeps: one B3.77 probe record per point of a declared matrix (ctx x kv_aligned x seed x dtype).

    sweep_dir = run_sweep("params/b3_76.yaml", {"gen": 64}, out_root="outputs")

A **matrix file** is a params YAML (greta/params.py) in which the axis keys ``ctx``, ``kv_aligned``,
``seed`` and ``dtype`` may be lists (a scalar is a one-value axis). Every other key is a base param shared
by all points. An optional ``point_overrides`` list sets params on some points only::

    point_overrides:
      - when: {ctx: 16384}                     # axis values the point must have
        set: {timeouts: {prefill: 1200}}       # params for those points

Every point's params are validated through :func:`greta.record.params.load_params` before anything runs, so a
bad matrix stops in one line (:class:`~greta.record.params.ParamError`).

Layout (docs/RECORD.md)::

    <out_root>/<YYYY-MM-DD>/<probe>-sweep/<sweep-id>/
        config.json          the declared matrix (axes, base params, point_overrides, point names), written
                             atomically before the first point
        points/<point>/      one probe record per point, e.g. points/ctx4096-kv1-seed0-bfloat16/
        points/<point>.incomplete-<k>/   an incomplete record moved aside on resume (never deleted)
        sweep_log.jsonl      one line per point attempt: skipped / ran (verdict) / error
        sweep_report.ipynb, sweep_report.html, *.png   the aggregate report (notebooks/sweep_report.ipynb)
        sweep_verdict.json   PASS_GUARDRAIL | FAIL_GUARDRAIL | INCOMPLETE, with reasons

A point is **complete** when its record verifies strictly
(``greta.checks.verify.verify(dir, allow_missing_large=False) == []``: sealed manifest, hashes, phases, logits
re-checked) and its verdict is not INTERRUPTED. A fault verdict (FAIL_OOM at the largest ctx, FAIL_TIMEOUT,
...) is a complete result: the sweep carries on to the next point, and a resume does not rerun it.

Resume: pass the existing sweep directory. Complete points are skipped; an incomplete point directory (a
killed run, a damaged record) is moved aside to ``points/<name>.incomplete-<k>/`` and the point is rerun.
A resume whose declared matrix differs from config.json is refused (:class:`SweepError`, one line).
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import yaml

from greta.record.files import RecordFileError, Verdict
from greta.sweeps import layout
from greta.sweeps.layout import (AXES, CONFIG, LOG, VERDICT, SweepError, point_complete, point_name, points,
                                 read_config)
from greta.record.params import DEFAULTS, ParamError, _coerce, _flat, _flat_defaults, _read_yaml, load_params

__all__ = ["AXES", "SweepError", "load_matrix", "points", "point_name", "point_complete", "run_sweep",
           "read_config", "matrix_from_config"]



def _axis_values(key: str, value, source: str) -> list:
    if isinstance(value, str) and value.strip().startswith("["):  # a CLI override: -p ctx=[256,512]
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ParamError(f"matrix axis {key}={value!r} (from {source}) is not a YAML list; write e.g. -p {key}=[256,512]") from None
    vals = value if isinstance(value, list) else [value]
    if not vals:
        raise ParamError(f"matrix axis {key} (from {source}) is an empty list; give at least one value")
    if any(isinstance(v, (list, dict)) for v in vals):
        raise ParamError(f"matrix axis {key}={vals!r} (from {source}): values must be scalars")
    return vals


def load_matrix(path=None, overrides: dict | None = None) -> dict:
    """Read and validate a matrix file plus ``key=value`` overrides (axis overrides replace the axis).

    Returns ``{"file", "axes": {ctx, kv_aligned, seed, dtype: [values]}, "base": {flat params},
    "point_overrides": [...], "params": {point name: validated params}}``. Raises ParamError (one line).
    """
    data = _read_yaml(path) if path else {}  # the params file reader: duplicate keys, BOM, ... refused
    m = matrix_from_data(data, str(path) if path else "defaults", overrides)
    m["file"] = str(path) if path else None
    return m


def matrix_from_data(data: dict, source: str, overrides: dict | None = None) -> dict:
    """load_matrix's validation, on a mapping already read (a matrix file's, or config.json's).

    Axis values and ``when`` values are coerced to the params' types once, up front (``-p seed=3`` is the
    int 3, ``256.0`` is 256), so duplicates are caught and ``when`` matches what the points run with."""
    data = copy.deepcopy(data)
    point_overrides = data.pop("point_overrides", None) or []
    known = _flat_defaults()
    axes = {k: [DEFAULTS[k]] for k in AXES}
    base: dict = {}
    for src, layer in ((source, data), ("override", dict(overrides or {}))):
        for key, value in _flat(layer, src).items():
            if key in AXES:
                axes[key] = [_coerce_axis(key, v, f"matrix axis {key} (from {src})") for v in _axis_values(key, value, src)]
            elif key not in known:
                raise ParamError(f"unknown param {key!r} (from {src}); known: {', '.join(sorted(known))}, point_overrides")
            else:
                base[key] = value
    if any(len(set(vals)) != len(vals) for vals in axes.values()):
        raise ParamError(f"matrix {source} has duplicate axis values: {axes}")
    if not isinstance(point_overrides, list) or not all(
            isinstance(o, dict) and set(o) == {"when", "set"} and isinstance(o["when"], dict)
            and isinstance(o["set"], dict) for o in point_overrides):
        raise ParamError(f"point_overrides (from {source}) must be a list of {{when: {{axis: value}}, set: {{param: value}}}}")
    rules = []  # (when, set) with when's values coerced and set flattened
    for o in point_overrides:
        bad = [k for k in o["when"] if k not in AXES]
        if bad:
            raise ParamError(f"point_overrides: when-key {bad[0]!r} is not an axis ({', '.join(AXES)})")
        sets = _flat(o["set"], "point_overrides")
        bad = [k for k in sets if k in AXES]
        if bad:
            raise ParamError(f"point_overrides: cannot set the axis {bad[0]!r}; change the axis list instead")
        when = {k: _coerce_axis(k, v, f"point_overrides: when {k}") for k, v in o["when"].items()}
        rules.append((when, sets))
    params: dict = {}
    for combo in layout._combos(axes):
        name = point_name(combo)
        over = dict(base)
        for when, sets in rules:
            if all(combo[k] == v for k, v in when.items()):
                over.update(sets)
        over.update(combo)
        try:
            params[name] = load_params(None, over)
        except ParamError as e:
            raise ParamError(f"matrix {source}, point {name}: {e}") from None
    return {"file": None, "axes": axes, "base": base, "point_overrides": point_overrides,
            "params": params}


def _coerce_axis(key: str, value, where: str):
    """An axis value as load_params will type it ("3" from a CLI override is 3, 256.0 is 256)."""
    try:
        return _coerce(key, value, DEFAULTS[key])
    except ParamError as e:
        raise ParamError(f"{where}: {e}") from None


def _declared(matrix: dict) -> dict:
    """What config.json records and what a resume must match."""
    return {"axes": matrix["axes"], "base": matrix["base"], "point_overrides": matrix["point_overrides"]}


def matrix_from_config(cfg: dict, overrides: dict | None = None) -> dict:
    """Re-validate the matrix a config.json declares (a resume without the matrix file)."""
    data = {**cfg["base"], **cfg["axes"], "point_overrides": cfg.get("point_overrides", [])}
    m = matrix_from_data(data, CONFIG, overrides)
    m["file"] = cfg.get("matrix_file")
    return m


def _sweep_name_parts(matrix: dict) -> list[str]:
    """<model>-<matrix file stem>: greta.record.rundir adds the time before and a random suffix after."""
    model = Path(next(iter(matrix["params"].values()))["model"]).name or "model"
    return [model, Path(matrix["file"]).stem if matrix.get("file") else "matrix"]


def _log(sweep_dir: Path, **entry):
    from greta.record.store import _now

    with open(sweep_dir / LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps({"t_utc": _now(), **entry}) + "\n")


def _say(progress: bool, msg: str):
    if progress:
        print(f"greta sweep: {msg}", file=sys.stderr, flush=True)


def _move_aside(d: Path) -> Path:
    k = 1
    while (d.parent / f"{d.name}.incomplete-{k}").exists():
        k += 1
    dest = d.parent / f"{d.name}.incomplete-{k}"
    d.rename(dest)
    return dest


def run_sweep(matrix_file=None, overrides: dict | None = None, out_root="outputs", sweep_dir=None,
              progress: bool = True, report: bool = True) -> Path:
    """Run (or resume, with ``sweep_dir``) every point of the matrix; return the sweep directory.

    Without ``matrix_file`` a resume takes the matrix from the sweep's config.json. A point that fails
    is a result; the sweep goes on. Ctrl-C / SIGTERM stops the sweep (the point's record says
    INTERRUPTED; a resume reruns it). With ``report``, the aggregate report is executed and
    sweep_verdict.json written at the end (greta.sweeps.report.finish).
    """
    from greta.record.rundir import allocate_run_dir
    from greta.record.store import RecordError, _now, atomic_write_text, git_state, preflight
    from greta.probe.runner import run_probe

    if sweep_dir is not None:
        sweep_dir = Path(sweep_dir)
        cfg = read_config(sweep_dir)
        matrix = load_matrix(matrix_file, overrides) if matrix_file else matrix_from_config(cfg, overrides)
        declared = json.loads(json.dumps(_declared(matrix)))
        diff = [k for k in ("axes", "base", "point_overrides") if cfg.get(k) != declared[k]]
        if diff:
            detail = "; ".join(f"{k}: config.json {cfg.get(k)} vs now {declared[k]}" for k in diff)
            raise SweepError(f"refusing to resume {sweep_dir}: the declared matrix differs ({detail[:400]}); "
                             "start a new sweep instead")
    else:
        matrix = load_matrix(matrix_file, overrides)
        first = next(iter(matrix["params"].values()))
        preflight(out_root, first)
        sweep_dir = allocate_run_dir(out_root, f"{first['probe']}-sweep", _sweep_name_parts(matrix))
        cfg = {"format": 1, "sweep_id": sweep_dir.name, "matrix_file": matrix["file"], "created_utc": _now(),
               **git_state(), **_declared(matrix), "points": [p["name"] for p in points(matrix)]}
        atomic_write_text(sweep_dir / CONFIG, json.dumps(cfg, indent=2, default=str) + "\n")
    pdir = sweep_dir / "points"
    pdir.mkdir(exist_ok=True)
    todo = points(matrix)
    for i, pt in enumerate(todo, 1):
        name, d = pt["name"], pdir / pt["name"]
        if d.exists():
            ok, reasons = point_complete(d)
            if ok:
                _say(progress, f"[{i}/{len(todo)}] {name}: complete, skipped")
                _log(sweep_dir, point=name, action="skipped")
                continue
            aside = _move_aside(d)
            _say(progress, f"[{i}/{len(todo)}] {name}: incomplete ({reasons[0]}); moved to {aside.name}, rerunning")
            _log(sweep_dir, point=name, action="moved_aside", to=aside.name, reasons=reasons)
        _say(progress, f"[{i}/{len(todo)}] {name}: running")
        try:
            run_probe(matrix["params"][name], run_dir=d, progress=progress)
        except RecordError:
            raise  # an unwritable/full output folder fails every later point too
        except Exception as e:  # noqa: BLE001 - one broken point must not stop the sweep
            msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            _say(progress, f"[{i}/{len(todo)}] {name}: error: {msg}")
            _log(sweep_dir, point=name, action="error", error=msg)
            continue
        try:
            v = Verdict.read(d)
            verdict, reason = v.verdict, v.reason
        except (OSError, RecordFileError):
            verdict, reason = None, "no verdict.json"
        _say(progress, f"[{i}/{len(todo)}] {name}: {verdict}")
        _log(sweep_dir, point=name, action="ran", verdict=verdict, reason=reason)
    if report:
        from greta.sweeps.report import finish

        finish(sweep_dir, progress=progress)
    return sweep_dir
