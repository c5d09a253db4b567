"""Peer engines under audit (greta.engine.peers, docs/ENGINES.md): engine=hf runs B3.77 through transformers'
own prefill and decode on the same model file. Its params are refused in one line where Greta's modes would
not apply; its adapter's decode from the cache is held against its own prefill over the same tokens, and a
wrong position is refused; a probe on the real SmolLM2 file gives a record naming the engine."""
from __future__ import annotations

import pytest
import torch

from greta.probe.preflight import preflight
from greta.record.params import ParamError, load_params


@pytest.mark.parametrize("over,words", [
    ({"engine": "hf"}, "kv_aligned=1 (Greta's) does not apply; use -p kv_aligned=0"),
    ({"engine": "hf", "kv_aligned": 0, "perturb": "rope_offset"}, "use -p perturb=none"),
    ({"engine": "hf", "kv_aligned": 0, "backend": "triton"}, "use -p backend=torch"),
    ({"engine": "hf", "kv_aligned": 0, "probe": "batch"}, "is for the b3_77 probe"),
    ({"engine": "vllm"}, "is not one of"),
])
def test_greta_only_params_with_a_peer_engine_are_one_line(over, words):
    with pytest.raises(ParamError) as e:
        load_params(None, over)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_peer_engine_needs_the_models_own_file():
    with pytest.raises(ParamError) as e:
        preflight(load_params("params/cpu_default.yaml", {"engine": "hf", "kv_aligned": 0}))
    assert "synthetic presets" in str(e.value) and "\n" not in str(e.value)


def test_hf_adapter_decodes_from_its_cache_as_its_prefill_computes(hf_checkpoint):
    pytest.importorskip("accelerate")
    from greta.engine.peers import make_engine
    from greta.engine.source import load_config

    d = hf_checkpoint("peer")
    cfg = load_config(str(d))
    eng = make_engine("hf", str(d), cfg, torch.float32, torch.device("cpu"), max_tokens=24)
    ids = torch.randint(0, cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(0))
    first = eng.prefill(ids[:16])
    steps = [eng.decode(ids[16 + j], 16 + j) for j in range(4)]
    with pytest.raises(ValueError, match="cache's length 20"):
        eng.decode(ids[0], 5)
    eng.cache.reset()
    ref = eng.prefill(ids, keep=list(range(15, 20)))  # the reference: one forward over all of them
    got = torch.stack([first[0], *steps])
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-4, rtol=0)
    assert eng.about["name"] == "hf" and eng.cache.nbytes() > 0


@pytest.mark.slow
def test_hf_probe_on_smollm2_names_the_engine(tmp_path):
    pytest.importorskip("accelerate")
    from greta.engine.real_models import RealModelMissing, real_model_path
    from greta.probe.runner import run_probe
    from greta.record.files import read_record

    try:
        real_model_path("smollm2")
    except RealModelMissing as e:
        pytest.skip(str(e))
    p = preflight(load_params("params/smollm2.yaml", {"engine": "hf", "kv_aligned": 0, "ctx": 64, "gen": 4, "span": 2}))
    run_dir = run_probe(p, out_root=tmp_path, progress=False)
    rec = read_record(run_dir)
    assert rec.verdict.verdict == "ENGINE_DRIFT" and rec.metadata.to_dict()["engine"]["name"] == "hf"
    assert "first at step" in rec.verdict.reason
    assert "Engine under audit: **hf**" in (run_dir / "report.md").read_text()


def test_tp3_is_taken_where_it_divides_the_model_and_refused_in_one_line_where_not():
    """tp=3 (SmolLM2: 9 heads, 3 KV heads, MLP 1536, vocabulary 49152); the tiny preset's heads do not divide."""
    with pytest.raises(ParamError) as e:
        load_params(None, {"tp": 3})
    assert "does not divide model tiny" in str(e.value) and "\n" not in str(e.value)
    from greta.engine.config import ModelConfig, tp_indivisible

    smol = ModelConfig(name="smollm2", vocab_size=49152, hidden_size=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                       intermediate_size=1536)
    assert tp_indivisible(smol, 3) == []
