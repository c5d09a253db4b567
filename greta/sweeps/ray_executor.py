"""A sweep's points as Ray tasks (``greta sweep --executor ray [--address HOST:PORT]``).

    run_sweep("params/b3_77_sweep.yaml", executor="ray", address="10.0.0.1:6379")

Each point is one Ray task in a placement group of its own: one bundle of ``tp`` GPUs (a GPU point) or one CPU
(a CPU point), STRICT_PACK, so a point's ranks share one node. The task runs the point exactly as the local
executor does, ``python -m greta.sweeps.point <sweep dir> <point>`` in a session of its own
(greta.sweeps.parallel.start_point_process), on the GPUs Ray gave the task, and returns its exit code and node id.

Records travel through a **shared path**: the sweep directory must be the same path on every node (NFS, Lustre,
a Slurm job's shared scratch; on one machine, any path). The point writes its record there, the sweep process
verifies it when the task ends (greta.sweeps.parallel._ended) and writes sweep_log.jsonl, as a local sweep does.

Faults: the point process gets SIGKILL if its Ray worker dies (PR_SET_PDEATHSIG), and the sweep completes its
record from the checkpoint as FAIL_ERROR naming the node; a point process that dies is FAIL_ERROR naming the
node too. Ctrl-C / SIGTERM cancels every task: a running task passes SIGINT to its point, which writes its
INTERRUPTED record; queued tasks never start. A point no node can hold (tp above every node's GPUs) is refused
before anything runs. Ray is imported only here, so it is needed only with --executor ray.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from greta.record.params import ParamError
from greta.sweeps.parallel import EXIT_INTERRUPTED, INTERRUPT_GRACE_S, start_point_process

INSTALL = "pip install 'greta[ray]'"
# Ray turns a local node's 127.0.0.1 into the machine's network address so that other nodes can join; with this
# switch off (Ray's own for machines where clusters are not supported) a local cluster binds to loopback only,
# so a sweep started without --address never listens on, or sends to, anything but 127.0.0.1.
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _die_with_worker():
    """In the point's process before exec: SIGKILL when the Ray worker that started it dies (Linux), so a
    lost worker leaves a checkpoint the sweep completes as FAIL_ERROR, not an orphan."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_point_task(sweep_dir: str, name: str, grace_s: float) -> dict:
    """The body of a point's Ray task: the point's process on the task's GPUs; a cancel (KeyboardInterrupt
    raised here by ray.cancel) passes SIGINT on and waits up to grace_s for the INTERRUPTED record."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    group = [str(g) for g in ray.get_gpu_ids()]
    proc = start_point_process(Path(sweep_dir), name, group, preexec=_die_with_worker)
    try:
        while proc.poll() is None:
            time.sleep(0.2)
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return {"rc": proc.wait(), "node": node}


class RayRun:
    """A point's Ray task, seen by the sweep loop as greta.sweeps.parallel.LocalRun sees a process."""

    pid = None

    def __init__(self, ref, pg, point_dir: Path):
        self.ref, self.pg, self.point_dir = ref, pg, point_dir
        self.rc, self.node, self.why, self._done = None, None, None, False

    def poll(self) -> int | None:
        import ray

        ready, _ = ray.wait([self.ref], timeout=0)
        return self._result() if ready else None

    def wait(self, timeout: float | None = None) -> int | None:
        import ray

        ready, _ = ray.wait([self.ref], timeout=timeout)
        if not ready:
            raise subprocess.TimeoutExpired("ray task", timeout)
        return self._result()

    def _result(self) -> int | None:
        """The point's exit code; EXIT_INTERRUPTED for a cancelled task that had started, None for one that
        never started; a dead worker or node: 1, with crash_reason naming the node."""
        import ray

        if self._done:
            return self.rc
        self._done = True
        try:
            out = ray.get(self.ref)
            self.rc, self.node = out["rc"], _node_address(out["node"])
        except ray.exceptions.TaskCancelledError:
            self.rc = EXIT_INTERRUPTED if self.point_dir.exists() else None
        except ray.exceptions.RayError as e:
            self.node = _bundle_node(self.pg)
            self.rc, self.why = 1, f"the Ray worker running the point on node {self.node} died ({type(e).__name__})"
        return self.rc

    def send_signal(self, sig: int) -> None:
        import ray

        ray.cancel(self.ref)  # KeyboardInterrupt in a running task; a queued one never starts

    def kill(self) -> None:
        import ray

        if not self._done:
            ray.cancel(self.ref, force=True)
        if self.pg is not None:
            ray.util.remove_placement_group(self.pg)
            self.pg = None

    def crash_reason(self, rc: int) -> str:
        from greta.probe.ranks import exit_reason

        return self.why or f"the point's process ended with {exit_reason(rc)} on node {self.node}"


def _bundle_node(pg) -> str:
    """The address of the node that held the placement group's bundle ('?' when Ray no longer says)."""
    import ray

    try:
        return _node_address(ray.util.placement_group_table(pg)["bundles_to_node_id"][0])
    except Exception:  # noqa: BLE001 - only a name for the error message
        return "?"


def _node_address(node_id: str) -> str:
    """'<address> (<id>)': a node's address as the cluster lists it, and its id's first 8 digits, which tell
    nodes of one host apart (only the id when the cluster no longer lists the node)."""
    import ray

    address = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id), None)
    return f"{address} ({node_id[:8]})" if address else node_id


def _need(params) -> tuple[str, int]:
    return ("GPU", params.tp) if params.device == "cuda" else ("CPU", 1)


def check_cluster(matrix, nodes: list[dict], where: str) -> None:
    """ParamError (one line) for a point no alive node of the cluster can hold, or a pinned GPU."""
    pinned = sorted({p.device for p in matrix.points()} - {"cpu", "cuda"})
    if pinned:
        raise ParamError(f"--executor ray with device={pinned[0]}: Ray gives each point its own GPUs; "
                         "write -p device=cuda")
    alive = [n["Resources"] for n in nodes if n.get("Alive")]
    for name, params in matrix.params.items():
        kind, n = _need(params)
        largest = max((r.get(kind, 0) for r in alive), default=0)
        if n > largest:
            raise ParamError(f"point {name} needs {n} {kind}(s) on one node, but the largest node of the Ray "
                             f"cluster {where} has {largest:g}; lower tp or add a larger node")


class RayExecutor:
    """Points as Ray tasks (module docstring): every point is submitted at once and Ray queues them."""

    name = "ray"

    def __init__(self, matrix, task, started_here: bool):
        self.matrix, self.task, self.started_here, self.runs = matrix, task, started_here, []

    @classmethod
    def connect(cls, matrix, address: str | None) -> RayExecutor:
        """Join the cluster at address (None: start a local one, or use the one this process already has), and
        check that every point fits on some node before anything runs."""
        if address is None:  # a cluster of this machine alone stays on loopback (below); read when ray is imported
            os.environ.setdefault(LOOPBACK_ONLY, "0")
        try:
            import ray
        except ImportError:
            raise ParamError(f"--executor ray needs Ray, which is not installed: {INSTALL}") from None
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                     **({} if address else {"_node_ip_address": "127.0.0.1"}))
        try:
            check_cluster(matrix, ray.nodes(), address or "started here")
        except ParamError:
            if started_here:
                ray.shutdown()
            raise
        task = ray.remote(max_retries=0)(run_point_task)
        return cls(matrix, task, started_here)

    def take(self, tp: int) -> list[str]:
        return []  # Ray's scheduler holds the queue: a point starts when its placement group is placed

    def give(self, group: list[str]) -> None:
        pass

    def start(self, sweep_dir: Path, name: str, group: list[str], tp: int) -> RayRun:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        kind, n = _need(self.matrix.params[name])
        bundle = {"CPU": 1, **({"GPU": n} if kind == "GPU" else {})}
        pg = placement_group([bundle], strategy="STRICT_PACK")
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
        ref = self.task.options(num_cpus=1, num_gpus=bundle.get("GPU", 0), scheduling_strategy=strategy).remote(
            str(Path(sweep_dir).resolve()), name, INTERRUPT_GRACE_S)
        self.runs.append(RayRun(ref, pg, Path(sweep_dir) / "points" / name))
        return self.runs[-1]

    def where(self, group: list[str], device: str) -> str:
        return "Ray"

    def close(self) -> None:
        import ray

        for run in self.runs:
            run.kill()
        if self.started_here:
            ray.shutdown()
