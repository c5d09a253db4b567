"""Starting a tensor-parallel group on one host, the way torchrun does, so the same code runs under either.

    results = spawn(my_fn, world=4, args=(...,))     # one command: 4 processes, results by rank
    torchrun --nproc-per-node 4 my_script.py         # or torchrun: my_script calls init_from_env too

spawn starts `world` fresh processes (multiprocessing's spawn: no forked CUDA state) with torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and with NVLink
multicast off (NO_MULTICAST: NCCL's NVLS, torch's symmetric memory and NVSHMEM; see the device README),
set in each process's environment before Python starts. Inside, fn calls init_from_env, which joins the
group from that environment (NCCL on cuda, gloo on cpu) with the collectives' timeout set, so a hung peer
ends in an error instead of a hang. A rank that raises, dies, or outlives timeout_s stops every rank and
raises SpawnError naming it; a rank that hangs in teardown after its result is killed (the issue's scout saw
destroy_process_group hang). Multi-node is torchrun's business: its environment is all this module reads.
"""
from __future__ import annotations

import os
import pickle
import queue as queue_mod
import socket
import time
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from greta.engine.tp import TPGroup
from greta.terminal import brief

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class SpawnError(RuntimeError):
    """A rank failed (raised, died or timed out): one line naming the rank; every rank has been stopped."""

    def __init__(self, rank: int | None, message: str):
        super().__init__(message)
        self.rank = rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def environ(values: dict[str, str | None]):
    """os.environ with values set (None: unset), restored after (a spawned child copies the parent's at start)."""
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _entry(fn, args, results):
    """A rank's body: fn(*args), its result or its error sent to the parent."""
    rank = int(os.environ["RANK"])
    try:
        # pickled here, by value: torch's queue would share a tensor's memory with a process about to exit
        results.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException as e:  # noqa: BLE001 - the parent names the rank and the error, then stops the rest
        results.put((rank, False, brief(f"{type(e).__name__}: {e}")))
        raise SystemExit(1) from None


def _stop(procs, grace_s: float = 5.0) -> None:
    """Terminate, then kill, every process still alive; reap them all."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def rank_environ(rank: int, world: int, port: int, master_addr: str = "127.0.0.1", env: dict | None = None) -> dict:
    """The environment of rank `rank` of a one-host group, as torchrun sets it, with NVLink multicast off (and
    env's extra variables; None unsets): set it around Process.start (environ) so the child starts with it."""
    return {**(env or {}), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(port), **NO_MULTICAST, "RANK": str(rank), "LOCAL_RANK": str(rank)}


def spawn(fn, world: int, args: tuple = (), *, timeout_s: float = 600.0, teardown_s: float = 30.0,
          master_addr: str = "127.0.0.1", port: int | None = None, env: dict | None = None) -> list:
    """fn(*args) in `world` processes of one host (module docstring); returns [result of rank 0, 1, ...].
    fn and args must pickle (fn at module level). env: more variables for every rank (None: unset), set
    before the interpreter starts (e.g. TRITON_INTERPRET, read when greta.kernels is first imported).
    Raises SpawnError naming the first rank that fails."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = port or free_port()
    procs = []
    try:
        for r in range(world):
            with environ(rank_environ(r, world, port, master_addr, env)):
                p = ctx.Process(target=_entry, args=(fn, args, results), name=f"greta-rank{r}")
                p.start()
            procs.append(p)
        got = _collect(procs, results, time.monotonic() + timeout_s, timeout_s)
        for p in procs:  # results are in; a rank stuck in teardown is killed, not waited for
            p.join(teardown_s)
        return [got[r] for r in range(world)]
    finally:
        _stop(procs)


def _collect(procs, results, deadline: float, timeout_s: float) -> dict:
    """Results by rank, until every rank has sent one; SpawnError on an error, a death or the deadline."""
    got: dict = {}
    while len(got) < len(procs):
        try:
            rank, ok, value = results.get(timeout=0.2)
        except queue_mod.Empty:
            dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode is not None]
            if dead and not _late_result(procs, results, got):
                r = dead[0]
                raise SpawnError(r, f"rank {r} died (exit code {procs[r].exitcode}) before sending a result")
            if time.monotonic() > deadline:
                late = [r for r in range(len(procs)) if r not in got]
                raise SpawnError(late[0], f"rank(s) {', '.join(map(str, late))} still running after {timeout_s:g} s; "
                                 "every rank was stopped")
            continue
        if not ok:
            _raise_root_cause(procs, got, rank, value)
        got[rank] = pickle.loads(value)
    return got


def _raise_root_cause(procs, got: dict, rank: int, error: str):
    """A rank's error is often a peer's death seen through a collective ("connection reset"): if another
    rank dies within a second, name that one (the cause), else the rank that failed."""
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        # exit code 1 is _entry's own after sending an error; a signal or another code is a death
        dead = [r for r, p in enumerate(procs) if r != rank and r not in got and p.exitcode not in (None, 0, 1)]
        if dead:
            r = dead[0]
            raise SpawnError(r, f"rank {r} died (exit code {procs[r].exitcode}); rank {rank} then failed: {error[:160]}")
        time.sleep(0.05)
    raise SpawnError(rank, f"rank {rank} failed: {error}")


def _late_result(procs, results, got: dict) -> bool:
    """A result that was still in the pipe when its rank's exit was seen: taken into got (True), else False."""
    try:
        rank, ok, value = results.get(timeout=1.0)
    except queue_mod.Empty:
        return False
    if not ok:
        _raise_root_cause(procs, got, rank, value)
    got[rank] = pickle.loads(value)
    return True


def init_from_env(device_type: str = "cpu", timeout_s: float = 600.0, exact: str = "rank_order"):
    """Join the group torchrun's environment describes -> (TPGroup, this rank's device). NCCL on cuda (the
    device is cuda:LOCAL_RANK), gloo on cpu; collectives time out after timeout_s. Sets NO_MULTICAST too,
    so a torchrun launch keeps multicast off as spawn does."""
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not set: start the ranks with greta.engine.launch.spawn or torchrun")
    os.environ.update(NO_MULTICAST)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    timeout = timedelta(seconds=timeout_s)
    if device_type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world, timeout=timeout, device_id=device)
    elif device_type == "cpu":
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    else:
        raise ValueError(f"device_type must be cuda or cpu, got {device_type!r}")
    return TPGroup(rank, world, dist.group.WORLD, exact), device


def finish() -> None:
    """Leave the group (if joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()
