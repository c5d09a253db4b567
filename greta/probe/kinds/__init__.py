"""The probe registry: one ProbeKind object per probe kind, and the one place that tells kinds apart.

    kind = kind_of(params)                  # a live run's Params: params.probe
    kind = record_kind(rec.params)          # a record's params.json dict (one without probe: B3.77's)
    workers = Workers.start(params, kind.job())
    kind.finish(rec, params, perf, results, vram_summary, sampler, failure)

A kind holds everything that differs from one probe to another: its params section (its ProbeSpec in
greta.record.kinds, which the record layer reads), its job (the phases in the worker), its record files and
finisher, its verdicts and exit codes, its report renderer, notebooks and the figures its run page shows, its
verify rules (the judgement held against the stored metrics, the logits recomputed), its machine checks
(preflight) and its sweep-report section. Nothing outside greta.record.kinds and this package tests a
probe's name (tests/test_architecture.py). A new kind is one module here plus its run notebook
(docs/ARCHITECTURE.md, "Where a change goes").
"""
from __future__ import annotations

from greta.probe.kinds.b3_77 import B3_77
from greta.probe.kinds.base import ProbeKind, UnknownKind
from greta.probe.kinds.batch import BATCH
from greta.probe.kinds.tp_invariance import TP_INVARIANCE
from greta.record.kinds import SPECS, kind_name

__all__ = ["KINDS", "ProbeKind", "UnknownKind", "kind_of", "kind_named", "record_kind"]

KINDS: dict[str, ProbeKind] = {k.name: k for k in (B3_77, BATCH, TP_INVARIANCE)}
assert tuple(KINDS) == tuple(SPECS), "every ProbeSpec has its ProbeKind, in the same order"


def kind_named(name: str) -> ProbeKind:
    """The kind of that name; UnknownKind (one line) for a name this checkout does not know."""
    try:
        return KINDS[name]
    except (KeyError, TypeError):
        raise UnknownKind(f"probe kind {name!r} is not one of {', '.join(KINDS)}; this checkout cannot read it") from None


def kind_of(params) -> ProbeKind:
    """The kind of a live run: its Params' probe (greta.record.params)."""
    return kind_named(params.probe)


def record_kind(params_json: dict) -> ProbeKind:
    """The kind a record's params.json dict names (greta.record.kinds.kind_name: one without probe is B3.77's);
    UnknownKind for a name this checkout does not know."""
    return kind_named(kind_name(params_json))
