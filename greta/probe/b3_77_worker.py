"""B3.77's phases in the worker process (greta/probe/worker.py runs them, one per request of the runner).

  ceilings   matmul rate and copy bandwidth (ProbeJob's, shared by every kind)
  load       the model (tp > 1: this rank's shard only), a Runner with its KV cache, the prompt
  prefill    the prompt, chunk by chunk: the first token and its logits
  decode     gen tokens greedily, one step each; the first span - 1 steps' logits kept
  reference  the teacher-forced prefill of prompt + those tokens: the same positions' logits
"""
from __future__ import annotations

import time

import numpy as np

from greta.probe.worker import ProbeJob, logits_digest, sync


class B377Job(ProbeJob):
    """B3.77: decode's logits against the prefill reference's over the span."""

    def load(self) -> dict:
        from greta.engine.config import tree_segments
        from greta.engine.runner import Runner
        from greta.engine.tokenize import make_prompt_from_params

        p = self.p
        if p.engine != "greta":
            return self._load_peer()
        cfg, w, source, model_hash = self.load_weights()
        self.cfg = cfg
        prompt, prompt_info = make_prompt_from_params(p, cfg.vocab_size)
        self.prompt = prompt.to(self.device)
        self.model = Runner(cfg, w, max_tokens=p.ctx + p.gen, kv_aligned=p.kv_aligned,
                            chunk=p.prefill_chunk, kv_block=p.kv_block, perturb=p.perturb,
                            backend=p.backend, tp=self.tp, tree_segments=tree_segments(cfg) if p.tp_invariant else 0)
        warmup_s = self._warmup() if self.device.type == "cuda" else 0.0
        weight_bytes = sum(t.nbytes for k, t in w.items() if not (k == "lm_head" and cfg.tie_embeddings))
        return {**self.loaded_figures(source, model_hash, weight_bytes, prompt_info), "warmup_s": warmup_s,
                "engine": {"name": "greta", "backend": p.backend, "kv_aligned": p.kv_aligned},
                **({"tp": {"world": self.tp.world, "exact": "tree" if p.tp_invariant else self.tp.exact}}
                   if self.tp else {}),
                **({"tree_segments": self.model.tree_segments} if p.tp_invariant else {})}

    def _load_peer(self) -> dict:
        """A peer engine (engine=hf, llamacpp): its adapter (greta.engine.peers) holds the model; Greta's weights are not
        loaded. The same prompt ids, the same phases through the adapter."""
        from greta.engine import weights
        from greta.engine.peers import make_engine
        from greta.engine.source import load_config, model_path, model_source
        from greta.engine.tokenize import make_prompt_from_params

        p = self.p
        self.cfg = load_config(p.model)
        prompt, prompt_info = make_prompt_from_params(p, self.cfg.vocab_size)
        self.prompt = prompt.to(self.device)
        self.model = make_engine(p.engine, p.model, self.cfg, self.dtype, self.device, p.ctx + p.gen)
        return {**self.loaded_figures(model_source(p.model), weights.checkpoint_hash(model_path(p.model)),
                               self.model.weight_bytes(), prompt_info), "warmup_s": 0.0, "engine": self.model.about}

    def _warmup(self) -> float:
        """Compile the Triton kernels, capture the decode graph and initialise cuBLAS/SDPA outside the timed
        phases: a short prefill and one decode step, then the cache is zeroed again."""
        t0 = time.perf_counter()
        n = min(self.p.ctx, self.p.prefill_chunk + 1)
        tok = self.model.prefill(self.prompt[:n])[0].argmax()
        self.model.decode(tok, n)
        self.model.cache.reset()
        sync(self.device)
        return time.perf_counter() - t0

    def prefill(self) -> dict:
        self.model.cache.reset()
        logits = self.model.prefill(self.prompt, progress=lambda d, t: self.progress("prefill", d, t, "pos"))
        self.first = logits[0].cpu().numpy()
        self.tokens = [int(logits[0].argmax())]
        return {"tokens": list(self.tokens)}

    def decode(self) -> dict:
        from greta.engine.requests import greedy, one_sequence

        def on_step(j, rows):
            self.progress("decode", j + 1, self.p.gen, "tok")

        (self.tokens,), (kept,) = greedy(one_sequence(self.model), [self.p.ctx], self.tokens, [self.p.gen],
                                         self.p.span - 1, on_step)
        self.decode_logits = np.stack([self.first] + [x.cpu().numpy() for x in kept])
        return {"tokens": list(self.tokens)}

    def reference(self) -> dict:
        from greta.engine.requests import reference

        ctx, span = self.p.ctx, self.p.span
        logits = reference(self.model, 0, self.prompt, self.tokens, span - 1,
                           progress=lambda d, t: self.progress("reference", d, t, "pos"))
        ref = logits.cpu().numpy()
        digest = {"logits_sha256": logits_digest(self.decode_logits, ref)} if self.tp else {}
        if self.rank:  # every rank holds the full logits; rank 0's go to the record, the others' digests are checked
            return {**digest, "tokens": list(self.tokens)}
        return {"reference_logits": ref, "decode_logits": self.decode_logits, "tokens": list(self.tokens),
                "positions": list(range(ctx - 1, ctx + span - 1)), **digest}
