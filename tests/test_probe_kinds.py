"""The probe registry (greta.probe.kinds, greta.record.kinds): every kind is complete and reachable by the
params that name it."""
from __future__ import annotations

import pytest

from greta.probe.kinds import KINDS, ProbeKind, UnknownKind, kind_named, kind_of, record_kind
from greta.record.kinds import SPECS
from greta.record.metrics import FAULT_VERDICTS
from greta.record.params import load_params


@pytest.mark.parametrize("name", list(KINDS))
def test_every_kind_is_complete(repo_root, name):
    k = kind_named(name)
    assert isinstance(k, ProbeKind) and k.spec is SPECS[name] and k.name == name
    for nb in (k.run_notebook, *k.analysis_notebooks):
        assert (repo_root / "notebooks" / nb).is_file(), nb
    peer = (k.engine_drift_verdict,) if k.engine_drift_verdict else ()  # B3.77's: a peer engine's ENGINE_DRIFT
    assert len(set(k.verdicts)) == 3 + len(peer) and not set(k.verdicts) & set(FAULT_VERDICTS)
    assert all(k.ok(v) for v in peer)
    assert k.job().__name__.endswith("Job") and k.exit_code(k.pass_verdict) == 0 and k.exit_code("FAIL_OOM") == 1
    assert k.ok(k.drift_verdict) and not k.ok(k.fail_verdict)


def test_kinds_do_not_share_verdicts_or_notebooks():
    verdicts = [v for k in KINDS.values() for v in k.verdicts]
    assert len(verdicts) == len(set(verdicts))
    assert len({k.run_notebook for k in KINDS.values()}) == len(KINDS)


def test_params_name_their_kind():
    assert kind_of(load_params()) is KINDS["b3_77"] and record_kind({"ctx": 1}) is KINDS["b3_77"]  # before probe existed
    assert kind_of(load_params(None, {"probe": "batch"})) is KINDS["batch"] and record_kind({"probe": "batch"}) is KINDS["batch"]
    assert kind_of(load_params(None, {"probe": "tp_invariance", "model": "tiny-tp", "tp": 2})) is KINDS["tp_invariance"]
    with pytest.raises(UnknownKind, match="probe kind 'tp_sizes' is not one of b3_77, batch, tp_invariance"):
        record_kind({"probe": "tp_sizes"})
    assert record_kind({"probe": 7}) is KINDS["b3_77"]  # params.json is untrusted: a probe that is no string
