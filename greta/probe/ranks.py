"""The probe's worker processes: one (tp=1), or one per tensor-parallel rank, driven phase by phase.

    workers = Workers.start(params, job_class)           # spawn context, SIGINT ignored in the workers
    status, payload, ranks = workers.run_phase("decode", timeout_s, bars)
    workers.stop(graceful=True)                          # "exit", join, then kill whatever is left

Under tensor parallelism (params tp > 1) each rank is a worker (greta.probe.worker.main) started with
torchrun's environment and NVLink multicast off, set before its interpreter starts (engine.launch's
rank_environ); its Job joins the group in the load phase. Every phase is sent to every rank and is done when
every rank has answered "done"; rank 0's result feeds the record, and each rank's own figures (wall time,
peak RSS, allocator peaks) come back beside it. Faults, the rule launch.spawn follows: a rank that dies is the
cause of its peers' errors (a collective that lost its peer), so within a second of the first failure the
runner names, in this order, a rank that died, a rank out of memory, a rank that raised, and last the ranks
that never reached a collective a peer gave up waiting in (a hang: FAIL_TIMEOUT). A phase past its timeout
kills every rank; so does any failure, and so does stop() for a rank that hangs in teardown.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import signal
import threading
import time
from multiprocessing.connection import wait as wait_any

GRACE_S = 1.0     # after a first failure: how long the other ranks get to show the cause (a death)
# when every failure so far blames a peer (a collective that timed out or lost it): how long the other ranks get
# to answer the same way, so that only a rank that never answers (the hung one) is named
PEER_GRACE_S = 5.0
TEARDOWN_S = 10.0  # after "exit": how long a rank may take to leave its group before it is killed


def exit_reason(code) -> str:
    """'signal 9 (SIGKILL)' for a process killed by a signal, else 'exit code N'."""
    if code is not None and code < 0:
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _start_ignoring_sigint(proc):
    """Start a worker with SIGINT ignored (inherited across exec): Ctrl-C reaches the whole process group, and
    the runner, not the worker, answers it; the worker would only add a KeyboardInterrupt traceback."""
    if threading.current_thread() is not threading.main_thread():
        proc.start()
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc.start()
    finally:
        signal.signal(signal.SIGINT, old)


class Workers:
    """The worker process of each rank (module docstring): procs, pipes and allocator figures by rank."""

    def __init__(self, procs, conns, stats, devices):
        self.procs, self.conns, self.stats, self.devices = procs, conns, stats, devices
        self.world = len(procs)

    @classmethod
    def start(cls, params, job_class) -> "Workers":
        from greta.engine.launch import environ, free_port, rank_environ
        from greta.probe.worker import main as worker_main

        ctx = mp.get_context("spawn")
        world = params.tp
        port = free_port() if world > 1 else None
        procs, conns, stats, devices = [], [], [], []
        for r in range(world):
            parent, child = ctx.Pipe()
            arr = ctx.Array("d", [float("nan"), float("nan")], lock=False)  # the worker's allocator figures
            name = "greta-probe-worker" if r == 0 else f"greta-probe-worker-rank{r}"
            proc = ctx.Process(target=worker_main, args=(params, child, arr, job_class), daemon=True, name=name)
            with environ(rank_environ(r, world, port) if world > 1 else {}):
                _start_ignoring_sigint(proc)
            procs.append(proc)
            conns.append(parent)
            stats.append(arr)
            cuda_rank = params.device == "cuda" and world > 1
            devices.append(f"cuda:{r}" if cuda_rank else params.device)
        return cls(procs, conns, stats, devices)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def allocator_source(self, r: int):
        """A callable reading rank r's allocator figures (None on the CPU: the worker leaves NaN)."""
        arr = self.stats[r]
        return lambda: None if math.isnan(arr[0]) else (arr[0], arr[1])

    def _who(self, r: int) -> str:
        return "worker process" if self.world == 1 else f"rank {r}"

    def run_phase(self, phase: str, timeout: float, bars):
        """Send phase to every rank and wait for them all. Returns (status, payload, ranks): status ok | oom |
        error | timeout | crash; payload rank 0's result (ok) or the failure's {"error", ...}; ranks: every
        rank's own figures when tp > 1 (None for one worker, or on a failure)."""
        failures: dict[int, tuple[str, dict]] = {}
        for r, conn in enumerate(self.conns):
            try:
                conn.send(phase)
            except OSError:  # a rank that died after its last phase's "done"
                failures[r] = self._death(r, phase)
        done: dict[int, dict] = {}
        deadline, first_failure = time.monotonic() + timeout, None
        while True:
            self._receive(phase, done, failures, bars)
            for r, p in enumerate(self.procs):
                if r not in done and r not in failures and p.exitcode is not None:
                    failures[r] = self._death(r, phase)
            if len(done) == self.world:
                return self._all_done(phase, done)
            now = time.monotonic()
            if failures:
                first_failure = first_failure or now
                grace = PEER_GRACE_S if all(p.get("collective_timeout") for _, p in failures.values()) else GRACE_S
                if len(done) + len(failures) == self.world or now - first_failure > grace:
                    self.kill()
                    return (*self._root_cause(phase, failures, done), None)
                continue  # a failure is being resolved: its grace, not the phase's deadline, ends the wait
            if now > deadline:
                self.kill()
                late = [r for r in range(self.world) if r not in done]
                still = "" if self.world == 1 else f" (rank(s) {', '.join(map(str, late))} still running); every rank"
                return "timeout", {"error": f"{phase} exceeded its {timeout:g} s timeout{still or '; worker'} killed",
                                   **({"ranks_running": late} if self.world > 1 else {})}, None

    def _receive(self, phase: str, done: dict, failures: dict, bars) -> None:
        """Take every message waiting (up to 0.2 s for the first) into done / failures; rank 0's progress
        goes to the bars."""
        waiting = [self.conns[r] for r in range(self.world) if r not in done and r not in failures]
        for conn in wait_any(waiting, timeout=0.2):
            r = self.conns.index(conn)
            try:
                kind, _, *rest = conn.recv()
            except (EOFError, OSError):
                continue  # the worker is gone: its exit code says how
            if kind == "progress":
                if r == 0:
                    bars.update(phase, *rest)
            elif kind == "done":
                done[r] = rest[0]
            elif kind in ("oom", "error"):
                failures[r] = (kind, rest[0])

    def _death(self, r: int, phase: str) -> tuple[str, dict]:
        self.procs[r].join(1.0)  # the exit code of a process that just closed its pipe
        why = exit_reason(self.procs[r].exitcode)
        return "crash", {"error": f"{self._who(r)} died with {why} during {phase} (a kernel crash, or the host OOM "
                                  "killer)", **({"rank": r} if self.world > 1 else {})}

    def _root_cause(self, phase: str, failures: dict, done: dict) -> tuple[str, dict]:
        """The failure to record: one worker's own; under tp, a death before an OOM before an error before a
        collective that timed out waiting for a peer (then the peers that never answered hung: a timeout)."""
        if self.world == 1:
            return failures[0]
        order = {"crash": 0, "oom": 1, "error": 2}  # an error of a collective that timed out: 3, the last

        def rank_key(item):
            r, (status, payload) = item
            return order[status] + bool(payload.get("collective_timeout")), r

        r, (status, payload) = min(failures.items(), key=rank_key)
        if status == "error" and payload.get("collective_timeout"):
            silent = [q for q in range(self.world) if q not in done and q not in failures]
            if silent:
                names = ", ".join(map(str, silent))
                return "timeout", {"error": f"rank(s) {names} did not answer; rank {r}'s collective timed out "
                                            f"waiting for them ({payload['error'][:160]}); every rank killed",
                                   "ranks_running": silent}
        payload = dict(payload)
        if status != "crash":
            payload["error"] = f"rank {r}: {payload['error']}"
        payload["rank"] = r
        return status, payload

    def _all_done(self, phase: str, done: dict):
        """Every rank answered: rank 0's result, each rank's figures, and the check that every rank computed
        the same logits (the digests a tensor-parallel reference sends)."""
        if self.world == 1:
            return "ok", done[0], None
        digests = {r: d.get("logits_sha256") for r, d in done.items()}
        differ = [r for r in range(1, self.world) if digests[r] != digests[0]]
        if differ:
            return "error", {"error": f"the logits of rank(s) {', '.join(map(str, differ))} differ from rank "
                                      "0's (sha256): the ranks did not compute the same model"}, None
        ranks = [{"rank": r, "wall_s": d.get("wall_s"), "max_rss_mb": d.get("max_rss_mb"),
                  **({"allocator": d["allocator"]} if "allocator" in d else {})} for r, d in sorted(done.items())]
        return "ok", done[0], ranks

    def stop(self, graceful: bool, teardown_s: float = TEARDOWN_S) -> None:
        """graceful: ask every live rank to leave ("exit": it leaves its group and returns) and wait up to
        teardown_s; then, or at once, kill every process still alive (one hung in destroy_process_group
        included) and reap them all."""
        if graceful:
            for conn, p in zip(self.conns, self.procs):
                if p.is_alive():
                    try:
                        conn.send("exit")
                    except OSError:
                        pass
            end = time.monotonic() + teardown_s
            for p in self.procs:
                p.join(max(0.0, end - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(10)
