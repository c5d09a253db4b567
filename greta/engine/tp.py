"""Tensor parallelism: which rank holds which slice of each weight, and making or loading only that slice.

Megatron's layout, `world` ranks (each tensor's dim: its family's engine.layout, Tensor.shard):
  wqkv  column-parallel: this rank's q heads, k heads and v heads, re-fused as [q; k; v] (bqkv, the
        q/k/v biases of a family that has them, alike)
  w13   column-parallel: this rank's gate rows and up rows, re-fused as [gate; up]
  wo    row-parallel: this rank's columns (its heads' part of the input); the partial sums are reduced
  w2    row-parallel: this rank's columns of the intermediate size; reduced likewise
  lm_head  vocab-parallel: this rank's rows of the vocabulary; the logits are all-gathered
  embed, norms  replicated (a tied lm_head is then a row slice of the replicated embed)
Each rank then runs the one decoder loop (model.forward) on its heads: it reads per-layer sizes from the
weight shapes. tp must divide n_heads, n_kv_heads, intermediate_size and vocab_size (no padding: every
Llama vocabulary Greta knows, 128256 and 32000, divides by 8; a checkpoint whose does not is refused).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from greta.engine.config import ModelConfig, tp_indivisible
from greta.engine.layout import layout_of, part_rows

@dataclass(frozen=True)
class TPGroup:
    """This process's place in a tensor-parallel group: rank, world size and the torch.distributed process
    group (None: the default group). `exact` names the reduction kv_aligned=1 uses (dist.EXACT: rank_order,
    any backend; one_shot, CUDA with symmetric memory)."""
    rank: int
    world: int
    group: object = None
    exact: str = "rank_order"

    def __post_init__(self):
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in 0..{self.world - 1}")


def check_divides(cfg: ModelConfig, world: int) -> None:
    """Refuse (one line) a tp that does not split the heads, the MLP and the vocabulary evenly."""
    bad = tp_indivisible(cfg, world)
    if bad:
        raise ValueError(f"tp={world} does not divide {', '.join(bad)} of model {cfg.name}; pick a tp that divides "
                         "the KV heads (and these)")


def role_slice(cfg: ModelConfig, role: str, shape: tuple[int, ...], rank: int, world: int) -> tuple[slice, ...] | None:
    """The index of rank's shard of a tensor of this role ("3.q", "embed", ...) and shape, cut along the dim
    the family's layout gives it; None: the whole tensor (replicated)."""
    dim = layout_of(cfg).tensor(role).shard
    if dim is None or world == 1:
        return None
    n = shape[dim] // world
    cut = slice(rank * n, (rank + 1) * n)
    return (cut,) if dim == 0 else (slice(None), cut)


def shard_tensor(cfg: ModelConfig, name: str, t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """rank's shard of the full fused weight `name` (greta's names: wqkv, wo, w13, w2, bqkv, lm_head, ...), as a
    new contiguous tensor (so the full one can be freed); a replicated tensor is returned as it is."""
    lay = layout_of(cfg)
    parts = lay.parts(name)
    if world == 1 or lay.tensor(parts[0]).shard is None:
        return t
    if len(parts) > 1:  # column-parallel: each part's rows cut, then re-fused
        return torch.cat([p.chunk(world)[rank] for p in t.split(part_rows(cfg, name))])
    index = role_slice(cfg, parts[0], tuple(t.shape), rank, world)
    return t if index is None else t[index].contiguous()


def shard_weights(cfg: ModelConfig, w: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """rank's shard of a full weight dict (tests; a run makes or loads only its shard: source.load_model's
    shard=(rank, world))."""
    check_divides(cfg, world)
    out = {k: shard_tensor(cfg, k, t, rank, world) for k, t in w.items() if k != "lm_head"}
    out["lm_head"] = shard_tensor(cfg, "lm_head", w["lm_head"], rank, world)
    return out


def synthetic_shard(cfg: ModelConfig, seed: int, dtype: torch.dtype, device, rank: int, world: int):
    """rank's shard of weights.synthetic(cfg, seed, ...): each full tensor is drawn on device with the same
    seeded generator, one at a time, cut and freed, so the values do not depend on world and the device
    never holds more than the shard plus one full tensor."""
    from greta.engine.weights import synthetic

    check_divides(cfg, world)
    return synthetic(cfg, seed, dtype, device, transform=lambda name, t: shard_tensor(cfg, name, t, rank, world))


def shard_slicer(cfg: ModelConfig, rank: int, world: int):
    """The slice_of(role, shape) callable the checkpoint loaders take (source.load_model(shard=...)): rank's rows
    or columns of each tensor, read from the memory-mapped file (safetensors' get_slice) without reading the
    rest."""
    return lambda role, shape: role_slice(cfg, role, shape, rank, world)
