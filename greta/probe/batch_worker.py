"""The batch probe's phases in the worker process (greta/probe/worker.py runs them, one per request of the
runner, under the same timeouts, fault injection and OOM handling as B3.77's).

  ceilings   as B3.77's (matmul rate, copy bandwidth: the floor's bandwidth)
  load       the model (tp > 1: this rank's shard only), a Runner with one KV slab per request, the prompts
  prefill    every request's prompt into its slab, one after the other (timed: prefill tokens/s)
  decode     (b): all requests decoded together, greedy; a request leaves when its steps are done (each step
             timed: ms per step against the floor)
  reference  per request (a): decoded alone, a batch of one, on the batch's tokens; and (c): the teacher-
             forced prefill of its prompt and those tokens
"""
from __future__ import annotations

import time

import numpy as np
import torch

from greta.probe.worker import ProbeJob, logits_digest, sync
from greta.record.batch import batch_plan, compared_steps, step_floor_bytes


def request_prompts(p, vocab: int, lengths: list[int]) -> tuple[list[torch.Tensor], dict]:
    """Request b's prompt: synthetic ids seeded by (seed, b); for a token file or text, the ctx-token prompt
    rotated left by 97 * b, first lengths[b] ids (distinct requests from the one given prompt)."""
    from greta.engine.prompt import synthetic_prompt
    from greta.engine.tokenize import make_prompt_from_params

    if p.prompt == "synthetic" and not p.prompt_file:
        prompts = [synthetic_prompt(n, vocab, p.seed * 1_000_003 + b) for b, n in enumerate(lengths)]
        return prompts, {"prompt_source": "synthetic, one seed per request"}
    base, info = make_prompt_from_params(p, vocab)
    return [torch.roll(base, -97 * b)[:n] for b, n in enumerate(lengths)], {**info, "per_request": "rotated by 97 x b"}


class BatchJob(ProbeJob):
    """State carried from phase to phase of the batch probe."""

    def load(self) -> dict:
        from greta.engine.runner import Runner

        p = self.p
        cfg, w, source, model_hash = self.load_weights()
        self.cfg = cfg
        self.lengths, self.gens = batch_plan(p)
        prompts, prompt_info = request_prompts(p, cfg.vocab_size, self.lengths)
        self.prompts = [t.to(self.device) for t in prompts]
        self.model = Runner(cfg, w, n_seqs=p.batch, max_tokens=p.ctx + p.gen, kv_aligned=p.kv_aligned,
                            chunk=p.prefill_chunk, kv_block=p.kv_block, perturb=p.perturb, backend=p.backend,
                            tp=self.tp)
        warmup_s = self._warmup() if self.device.type == "cuda" else 0.0
        self.weight_bytes = sum(t.nbytes for k, t in w.items()
                                if k != "embed" or cfg.tie_embeddings)  # a step reads every weight but the table
        prompt_info = {**prompt_info, "prompt_tokens": sum(self.lengths)}
        return {**self.loaded_figures(source, model_hash, sum(t.nbytes for t in w.values()), prompt_info),
                "warmup_s": warmup_s,
                "batch": {"lengths": self.lengths, "gens": self.gens},
                **({"tp": {"world": self.tp.world, "exact": self.tp.exact}} if self.tp else {})}

    def _warmup(self) -> float:
        """Compile kernels and initialise libraries outside the timed phases: a short prefill of request 0
        and one decode step of the whole batch; then every slab is zeroed again."""
        t0 = time.perf_counter()
        n = min(self.lengths[0], self.p.prefill_chunk + 1)
        for b in range(self.p.batch):
            self.model.prefill(self.prompts[0][:n], seq=b)
        self.model.decode_batch([1] * self.p.batch, [n] * self.p.batch, list(range(self.p.batch)))
        self.model.cache.reset()
        sync(self.device)
        return time.perf_counter() - t0

    def prefill(self) -> dict:
        from greta.engine.requests import prefill_all

        self.model.cache.reset()
        self.firsts = prefill_all(self.model, self.prompts, progress=lambda d, t: self.progress("prefill", d, t, "seq"))
        return {"tokens": [int(f.argmax()) for f in self.firsts], "prefill_tokens": sum(self.lengths)}

    def decode(self) -> dict:
        from greta.engine.requests import decode_together

        steps, kvb = [], self.cfg.kv_bytes_per_token(self.dtype.itemsize)
        total = max(self.gens)
        last = [time.perf_counter()]

        def on_step(j, rows):  # decode_together read the tokens: the step has finished on the device
            now = time.perf_counter()
            live = [self.lengths[b] + j for b in range(self.p.batch) if j < self.gens[b]]
            steps.append({"rows": rows, "ms": (now - last[0]) * 1e3,
                          "floor_bytes": step_floor_bytes(self.weight_bytes, kvb, live)})
            last[0] = now
            self.progress("decode", j + 1, total, "step")

        keep = compared_steps(self.p.span, max(self.gens))
        self.tokens, kept = decode_together(self.model, self.lengths, self.firsts, self.gens, keep, on_step)
        self.in_batch = [np.stack([f.cpu().numpy()] + [x.cpu().numpy() for x in k[:compared_steps(self.p.span, g)]])
                         for f, k, g in zip(self.firsts, kept, self.gens)]
        return {"tokens": self.tokens, "steps": steps}

    def reference(self) -> dict:
        from greta.engine.requests import decode_alone, reference

        alone, refs = [], []
        for b, (n, g) in enumerate(zip(self.lengths, self.gens)):
            k = compared_steps(self.p.span, g)
            a = decode_alone(self.model, b, n, self.tokens[b], k)
            alone.append(np.stack([self.firsts[b].cpu().numpy()] + [x.cpu().numpy() for x in a]))
            refs.append(reference(self.model, b, self.prompts[b], self.tokens[b], k).cpu().numpy())
            self.progress("reference", b + 1, self.p.batch, "seq")
        digest = {"logits_sha256": logits_digest(*alone, *self.in_batch, *refs)} if self.tp else {}
        if self.rank:  # every rank holds the full logits; rank 0's go to the record, the others' digests are checked
            return {**digest, "tokens": self.tokens}
        return {"alone": alone, "in_batch": self.in_batch, "reference": refs, "tokens": self.tokens,
                "lengths": self.lengths, "gens": self.gens, **digest}
