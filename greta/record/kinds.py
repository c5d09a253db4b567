"""The probe registry, its record side: what each probe kind's params and run directory are (pure data).

A probe kind is one object of greta.probe.kinds (its job, record, pages, checks, sweep section); this is the
part of it that the record layer needs before any of that can be imported (params validation, run-directory
names, the size of a record), so it imports nothing: params.py reads it, not the other way.

    spec = SPECS[params.probe]      # a live run's Params
    spec.name_parts(params)         # its run directory's extra name parts, e.g. ["b4"]
    kind_name(params_json)          # the kind a record's params.json dict names (one without probe: b3_77)

A new probe kind adds its ProbeSpec here (its own params, its own negative controls) and its ProbeKind in
greta/probe/kinds/ (docs/ARCHITECTURE.md, "Where a change goes").
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_KIND = "b3_77"  # a params.json older than the probe key is B3.77's


@dataclass(frozen=True)
class ProbeSpec:
    """One probe kind's params section and run-directory name.

    own_params: params only this kind takes; every other kind must leave them at their default (and its
    params.json leaves them out, so its shape is what it was before this kind existed).
    own_perturbs: negative controls only this kind can fail.
    name_tags: (param, prefix) pairs that name its run directories, e.g. ("batch", "b") -> "b4".
    min_tp: the fewest tensor-parallel ranks it runs on (the tp_invariance probe compares degrees 1..tp)."""
    name: str
    own_params: tuple[str, ...] = ()
    own_perturbs: tuple[str, ...] = ()
    name_tags: tuple[tuple[str, str], ...] = ()
    min_tp: int = 1

    def name_parts(self, params) -> list[str]:
        """The run directory's name parts this kind adds for a run with these Params (greta.record.params)."""
        return [f"{prefix}{getattr(params, key)}" for key, prefix in self.name_tags]


SPECS = {s.name: s for s in (
    # the segment-tree mode (docs/TP.md) and the peer engines (docs/ENGINES.md) run B3.77's probe
    ProbeSpec("b3_77", own_params=("tp_invariant", "engine")),
    ProbeSpec("batch", own_params=("batch", "batch_lengths", "batch_gen"), own_perturbs=("batch_split_k",),
              name_tags=(("batch", "b"),)),
    # degrees 1, 2, .. tp of one prompt, the segment tree always on; its control turns the tree off (docs/TP.md)
    ProbeSpec("tp_invariance", own_perturbs=("tp_plain_order",), min_tp=2),
)}
KIND_NAMES = tuple(SPECS)


def kind_name(params_json: dict) -> str:
    """The probe kind a record's params.json dict names: a JSON reader (a live run's Params says params.probe).
    One older than the probe key, or whose probe is no string, is B3.77's; the name may be one this checkout
    does not know."""
    name = params_json.get("probe", DEFAULT_KIND)
    return name if isinstance(name, str) else DEFAULT_KIND


def foreign_params() -> dict[str, tuple[str, ...]]:
    """kind -> the params other kinds own (what that kind must leave at their defaults)."""
    return {k: tuple(p for other in SPECS.values() if other.name != k for p in other.own_params) for k in SPECS}
