"""The probe's prompt: seeded synthetic token ids, or ids read from a file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def synthetic_prompt(ctx: int, vocab: int, seed: int) -> torch.Tensor:
    """ctx token ids drawn uniformly from [0, vocab) by torch's CPU generator (Mersenne Twister) seeded
    with `seed`; the same ids on every machine and device."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, vocab, (ctx,), generator=g, dtype=torch.int64)


def read_ids(path) -> np.ndarray:
    """Token ids of a .npy array or a text file of integers separated by spaces, commas or newlines.
    Raises ValueError (or OSError) for anything else."""
    p = Path(path)
    if p.suffix == ".npy":
        ids = np.load(p, allow_pickle=False).reshape(-1)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"a .npy of {ids.dtype}, not integers")
        return ids.astype(np.int64)
    return np.array(p.read_text().replace(",", " ").split(), dtype=np.int64)


def file_prompt(path, ctx: int, vocab: int) -> torch.Tensor:
    """The first ctx ids of a token-id file (read_ids)."""
    ids = read_ids(path)
    if ids.size < ctx:
        raise ValueError(f"prompt file {path} holds {ids.size} token ids but ctx={ctx}; give a longer file or a smaller ctx")
    ids = ids[:ctx].astype(np.int64)
    if ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(f"prompt file {path} has ids outside [0, {vocab}) for this model")
    return torch.from_numpy(ids)


def make_prompt(spec: str, ctx: int, vocab: int, seed: int) -> torch.Tensor:
    return synthetic_prompt(ctx, vocab, seed) if spec == "synthetic" else file_prompt(spec, ctx, vocab)
