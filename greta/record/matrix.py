"""A sweep's declared matrix: axes (ctx x kv_aligned x seed x dtype, and batch, engine where declared), base
params, point_overrides.

A **matrix file** is a params YAML in which the axis keys may be lists (a scalar is a one-value axis);
every other key is a base param shared by all points; ``point_overrides`` sets params on some points only::

    point_overrides:
      - when: {ctx: 16384}                     # axis values the point must have
        set: {timeouts: {prefill: 1200}}       # params for those points

An ``engine`` axis (``engine: [greta, hf]``) runs the same points through peer engines (docs/ENGINES.md). A
combination a peer cannot run (engine=hf with kv_aligned=1: Greta's exact mode, which a peer does not have) is
skipped by the matrix rule (:func:`refusal`), not failed: it is no point, and the sweep report names it and why.

Parsing is pure (no torch, no machine): every point's params are built through the one params validator
(:meth:`greta.record.params.Params.from_layers`), so a bad matrix stops in one line (ParamError).
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

from greta.record.params import (DEFAULTS, Params, ParamError, coerce, flat_keys, flatten, peer_fixed,
                                 load_yaml_text, read_params_file, show)

AXES = ("ctx", "kv_aligned", "seed", "dtype")  # point names and execution order follow this order
BATCH_AXIS = "batch"  # the batch probe's axis: an axis only where a matrix declares it (after kv_aligned)
ENGINE_AXIS = "engine"  # the engine under audit (greta, hf, ...): an axis only where declared (after batch)
OPTIONAL_AXES = (BATCH_AXIS, ENGINE_AXIS)


def axis_keys(axes) -> tuple[str, ...]:
    """The axes of a declared matrix in execution order: AXES, with batch and engine after kv_aligned where
    declared."""
    return AXES[:2] + tuple(k for k in OPTIONAL_AXES if k in axes) + AXES[2:]


@dataclass(frozen=True)
class Matrix:
    """The declared matrix. axes: {axis: [values]} (coerced to the params' types); base: the shared params
    as declared (flat keys); point_overrides: the declared rules; params: {point name: Params}."""
    file: str | None
    axes: dict
    base: dict
    point_overrides: list
    params: dict

    def points(self) -> list[Params]:
        """Every point's params, in run order (ctx-major, then kv_aligned, seed, dtype)."""
        return list(self.params.values())

    def skipped(self) -> list[tuple[str, str]]:
        """(point name, why) of each declared combination the matrix rule skips (refusal)."""
        return skipped(self.axes)

    def declared(self) -> dict:
        """What config.json records and what a resume must match."""
        return {"axes": self.axes, "base": self.base, "point_overrides": self.point_overrides}


def point_name(point) -> str:
    batch = f"-b{point[BATCH_AXIS]}" if BATCH_AXIS in point else ""
    engine = f"-{point[ENGINE_AXIS]}" if ENGINE_AXIS in point else ""
    return f"ctx{point['ctx']}-kv{point['kv_aligned']}{batch}{engine}-seed{point['seed']}-{point['dtype']}"


def all_combos(axes: dict) -> list[dict]:
    """Every combination of the axes' values: ctx-major, then kv_aligned, (batch, engine,) seed, dtype, each in
    declared order."""
    keys = axis_keys(axes)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(axes[k] for k in keys))]


def refusal(combo: dict) -> str | None:
    """The matrix rule: why this combination of axis values cannot be a point (a peer engine with one of Greta's
    own modes, e.g. engine=hf with kv_aligned=1), else None. Such a combination is skipped, not failed; a
    single run with it is refused (greta.record.params.peer_fixed)."""
    engine = combo.get(ENGINE_AXIS, "greta")
    if engine == "greta":
        return None
    fixed = peer_fixed(engine)
    bad = [f"{k}={combo[k]}" for k, want in fixed.items() if k in combo and combo[k] != want]
    if not bad:
        return None
    return (f"engine={engine} runs its own prefill and decode, which have no {', '.join(bad)} (Greta's mode; a peer "
            f"runs with {', '.join(f'{k}={fixed[k]}' for k in fixed if k in combo)})")


def combos(axes: dict) -> list[dict]:
    """The points of the axes in run order: every combination the matrix rule (refusal) does not skip."""
    return [c for c in all_combos(axes) if refusal(c) is None]


def skipped(axes: dict) -> list[tuple[str, str]]:
    """(point name, why) of each combination of the axes the matrix rule skips (only a peer engine's can be)."""
    if ENGINE_AXIS not in axes:
        return []
    return [(point_name(c), why) for c in all_combos(axes) if (why := refusal(c)) is not None]


def load_matrix(path=None, overrides: dict | None = None) -> Matrix:
    """Read and validate a matrix file plus ``key=value`` overrides (axis overrides replace the axis)."""
    data = read_params_file(path) if path else {}  # the params file reader: aliases, duplicate keys, BOM... refused
    return matrix_from_data(data, str(path) if path else "defaults", overrides, file=str(path) if path else None)


def matrix_from_data(data: dict, source: str, overrides: dict | None = None, file: str | None = None) -> Matrix:
    """A matrix from a mapping already read (a matrix file's, or config.json's) plus overrides.

    Axis values and ``when`` values are coerced to the params' types once, up front (``-p seed=3`` is the
    int 3, ``256.0`` is 256), so duplicates are caught and ``when`` matches what the points run with."""
    data = copy.deepcopy(data)
    point_overrides = data.pop("point_overrides", None) or []
    axes, base = _axes_and_base(data, source, overrides)
    rules = _rules(point_overrides, source)
    params: dict = {}
    for combo in combos(axes):
        name = point_name(combo)
        layers = [(f"matrix {source}", base)]
        layers += [("point_overrides", sets) for when, sets in rules if all(combo.get(k) == v for k, v in when.items())]
        try:
            params[name] = Params.from_layers(layers + [("axes", combo)])
        except ParamError as e:
            raise ParamError(f"matrix {source}, point {name}: {e}") from None
    if not params:
        raise ParamError(f"matrix {source}: every combination of its axes is skipped ({skipped(axes)[0][1]}); "
                         "add a value the engine runs with")
    return Matrix(file=file, axes=axes, base=base, point_overrides=point_overrides, params=params)


def _axes_and_base(data: dict, source: str, overrides: dict | None) -> tuple[dict, dict]:
    known = set(flat_keys())
    axes = {k: [DEFAULTS[k]] for k in AXES}
    base: dict = {}
    for src, layer in ((source, data), ("override", dict(overrides or {}))):
        for key, value in flatten(layer, src).items():
            if key in AXES or key in OPTIONAL_AXES:
                axes[key] = [_coerce_axis(key, v, f"matrix axis {key} (from {src})") for v in _axis_values(key, value, src)]
            elif key not in known:
                raise ParamError(f"unknown param {show(key)} (from {src}); known: {', '.join(sorted(known))}, point_overrides")
            else:
                base[key] = value
    if any(len(set(vals)) != len(vals) for vals in axes.values()):
        raise ParamError(f"matrix {source} has duplicate axis values: {show(axes, 200)}")
    return axes, base


def _rules(point_overrides, source: str) -> list[tuple[dict, dict]]:
    """(when, set) pairs with when's values coerced and set flattened."""
    if not isinstance(point_overrides, list) or not all(
            isinstance(o, dict) and set(o) == {"when", "set"} and isinstance(o["when"], dict)
            and isinstance(o["set"], dict) for o in point_overrides):
        raise ParamError(f"point_overrides (from {source}) must be a list of {{when: {{axis: value}}, set: {{param: value}}}}")
    rules = []
    for o in point_overrides:
        bad = [k for k in o["when"] if k not in AXES + OPTIONAL_AXES]
        if bad:
            raise ParamError(f"point_overrides: when-key {show(bad[0])} is not an axis ({', '.join(AXES + OPTIONAL_AXES)})")
        sets = flatten(o["set"], "point_overrides")
        bad = [k for k in sets if k in AXES + OPTIONAL_AXES]
        if bad:
            raise ParamError(f"point_overrides: cannot set the axis {show(bad[0])}; change the axis list instead")
        when = {k: _coerce_axis(k, v, f"point_overrides: when {k}") for k, v in o["when"].items()}
        rules.append((when, sets))
    return rules


def _axis_values(key: str, value, source: str) -> list:
    if isinstance(value, str) and value.strip().startswith("["):  # a CLI override: -p ctx=[256,512]
        try:
            value = load_yaml_text(value)
        except Exception:  # noqa: BLE001 - YAMLError, or the loader's refusal of aliases
            raise ParamError(f"matrix axis {key}={show(value)} (from {source}) is not a YAML list; write e.g. -p {key}=[256,512]") from None
    vals = value if isinstance(value, list) else [value]
    if not vals:
        raise ParamError(f"matrix axis {key} (from {source}) is an empty list; give at least one value")
    if any(isinstance(v, (list, dict)) for v in vals):
        raise ParamError(f"matrix axis {key}={show(vals)} (from {source}): values must be scalars")
    return vals


def _coerce_axis(key: str, value, where: str):
    """An axis value as the params will type it ("3" from a CLI override is 3, 256.0 is 256)."""
    try:
        return coerce(key, value)
    except ParamError as e:
        raise ParamError(f"{where}: {e}") from None
