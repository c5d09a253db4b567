"""The tp-invariance probe's phases in each rank's worker (greta/probe/worker.py runs them; greta.probe.ranks
starts tp workers, every phase to every rank, under the same timeouts, faults and OOM handling as B3.77's).

The tp ranks form one group; degree d (1, 2, .. tp: greta.record.tp_invariance.degrees_of) runs on ranks
0..d-1 as a group of its own (tp=1: rank 0 alone, no group), so every degree runs in this run's processes.

  ceilings   as B3.77's
  load       every degree's shard this rank holds (rank 0: all of them) and a Runner each, the tree on
             (S = engine.config.tree_segments; off under the control, perturb=tp_plain_order), the prompt
  prefill    per degree: the prompt, every position's logits kept
  decode     the first degree decodes gen tokens greedily; its tokens go to every rank, and every other degree
             decodes them (teacher-forced: the same inputs at every degree); span - 1 steps' logits kept
  reference  per degree: the teacher-forced prefill of the prompt and those tokens, the decode positions kept
"""
from __future__ import annotations

import numpy as np
import torch

from greta.probe.worker import MB, ProbeJob, collective_timeout_s, logits_digest
from greta.record.tp_invariance import CONTROL, PATHS, degrees_of


class TPInvarianceJob(ProbeJob):
    """State carried from phase to phase: a Runner per degree this rank takes part in."""

    def load(self) -> dict:
        from greta.engine.config import tree_segments
        from greta.engine.source import load_config
        from greta.engine.tokenize import make_prompt_from_params

        p = self.p
        self.degrees = degrees_of(p.tp)
        groups = self._join()
        cfg = load_config(p.model)
        self.cfg = cfg
        self.segments = tree_segments(cfg) if p.kv_aligned and p.perturb != CONTROL else 0
        self.models = {d: self._runner(cfg, d, groups[d]) for d in self.degrees if self.rank < d}
        prompt, prompt_info = make_prompt_from_params(p, cfg.vocab_size)
        self.prompt = prompt.to(self.device)
        self.logits: dict = {path: {} for path in PATHS}
        m = self.models[self.degrees[-1]]
        return {"config": cfg.to_dict(), **self._source(cfg), "param_count": cfg.param_count(),
                "weights_mb": sum(t.nbytes for t in self.models[self.degrees[0]].w.values()) / MB
                if self.rank == 0 else None,
                "kv_cache_mb": sum(r.cache.nbytes() for r in self.models.values()) / MB,
                "kv_cache_capacity": m.cache.capacity, "torch_threads": torch.get_num_threads(),
                "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                "prompt": prompt_info, "tp": {"world": p.tp, "exact": "tree" if self.segments else "rank_order",
                                              "degrees": self.degrees},
                **({"tree_segments": self.segments} if self.segments else {})}

    def _join(self) -> dict:
        """Join the tp ranks' group (the collectives' timeout below the phases'), then make each degree's group
        of ranks 0..d-1 (every rank takes part in making each, as torch.distributed asks). -> {d: TPGroup or None}."""
        import torch.distributed as dist

        from greta.engine.launch import init_from_env
        from greta.engine.tp import TPGroup

        # rank order, not the one-shot over symmetric memory: the same bits (docs/TP.md), on any group
        self.tp, _ = init_from_env(self.device.type, collective_timeout_s(self.p), exact="rank_order")
        groups: dict = {1: None}
        for d in self.degrees[1:]:
            g = self.tp.group if d == self.tp.world else dist.new_group(list(range(d)))
            groups[d] = TPGroup(self.rank, d, g, "rank_order") if self.rank < d else None
        return groups

    def _runner(self, cfg, d: int, group):
        """This rank's Runner at degree d: its shard of the model (the whole at d=1)."""
        from greta.engine.runner import Runner
        from greta.engine.source import load_model

        p = self.p
        w = load_model(p.model, p.seed, self.dtype, self.device, shard=(self.rank, d)).weights
        return Runner(cfg, w, max_tokens=p.ctx + p.gen, kv_aligned=p.kv_aligned, chunk=p.prefill_chunk,
                      kv_block=p.kv_block, perturb="none" if p.perturb == CONTROL else p.perturb,
                      backend=p.backend, tp=group, tree_segments=self.segments)

    def _source(self, cfg) -> dict:
        from greta.engine import weights
        from greta.engine.source import model_path, model_source

        kind = model_source(self.p.model)
        digest = weights.synthetic_hash(cfg, self.p.seed) if kind == "synthetic" else \
            weights.checkpoint_hash(model_path(self.p.model))
        return {"weights_source": kind, "model_hash": digest}

    def prefill(self) -> dict:
        total, done = self.p.ctx * len(self.models), 0
        for d, m in self.models.items():
            m.cache.reset()
            at = done
            logits = m.prefill(self.prompt, keep=list(range(self.p.ctx)),
                               progress=lambda k, n, at=at: self.progress("prefill", at + k, total, "pos"))
            self.logits["prefill"][d] = logits.cpu().numpy()
            done += self.p.ctx
        first = int(self.logits["prefill"][self.degrees[0]][-1].argmax()) if self.rank == 0 else None
        return {"tokens": [first] if first is not None else []}

    def decode(self) -> dict:
        """The first degree's greedy tokens (rank 0 holds it), sent to every rank, then every other degree on them."""
        import torch.distributed as dist

        p, ref = self.p, self.degrees[0]
        tokens = torch.zeros(p.gen + 1, dtype=torch.int64)
        if ref in self.models:
            tokens[0] = int(self.logits["prefill"][ref][-1].argmax())
            self.logits["decode"][ref] = self._decode(self.models[ref], tokens, greedy=True, done=0)
        dist.broadcast(tokens, src=0, group=self.tp.group)
        self.tokens = [int(t) for t in tokens]
        done = p.gen if ref in self.models else 0
        for d, m in self.models.items():
            if d != ref:
                self.logits["decode"][d] = self._decode(m, tokens, greedy=False, done=done)
                done += p.gen
        return {"tokens": self.tokens}

    def _decode(self, m, tokens: torch.Tensor, greedy: bool, done: int) -> np.ndarray:
        """gen steps from tokens[0] at position ctx; greedy: each step's argmax is written to tokens[j + 1], else
        tokens is the input (teacher-forced); done: steps this rank decoded before (its progress). -> the
        first span - 1 steps' logits."""
        ctx, kept, total = self.p.ctx, [], self.p.gen * len(self.models)
        for j in range(self.p.gen):
            logits = m.decode(tokens[j].to(self.device), ctx + j)
            if greedy:
                tokens[j + 1] = int(logits.argmax())
            if len(kept) < self.p.span - 1:
                kept.append(logits.cpu().numpy())
            self.progress("decode", done + j + 1, total, "tok")
        return np.stack(kept)

    def reference(self) -> dict:
        ctx, n = self.p.ctx, self.p.span - 1
        seq = torch.cat([self.prompt, torch.tensor(self.tokens[:n], device=self.device)])
        for i, (d, m) in enumerate(self.models.items()):
            m.cache.reset()
            self.logits["reference"][d] = m.prefill(seq, keep=list(range(ctx, ctx + n))).cpu().numpy()
            self.progress("reference", i + 1, len(self.models), "tp")
        top = self.degrees[-1]  # every rank holds the largest degree's logits: they must be rank 0's
        digest = logits_digest(*(self.logits[path][top] for path in PATHS))
        if self.rank:
            return {"logits_sha256": digest, "tokens": self.tokens}
        return {"logits_sha256": digest, "tokens": self.tokens, "degrees": self.degrees,
                "logits": {path: dict(self.logits[path]) for path in PATHS}}
