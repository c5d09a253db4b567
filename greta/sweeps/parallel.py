"""A sweep's points run concurrently, one per free group of GPUs (``greta sweep --gpus N``).

    run_sweep("params/b3_77_sweep.yaml", gpus=4)   # 4 points at a time at tp=1; 2 at a time at tp=2

The pool holds N GPU ids: the first N of the sweep process's CUDA_VISIBLE_DEVICES, else 0..N-1 (on the CPU,
N numbered slots that only limit how many points run at once). Points are taken in the matrix's order; a
point of tp=t waits for t free ids (the lowest free ones), so a large point is never overtaken forever by
small ones. Each point runs in its own process, ``python -m greta.sweeps.point <sweep dir> <point>``, in a
session of its own, with CUDA_VISIBLE_DEVICES set to its group (its ranks see cuda:0..t-1; the VRAM samplers
map them back to the physical cards through greta.probe.vram.physical_index, NVML counting in PCI order as
CUDA_DEVICE_ORDER=PCI_BUS_ID makes CUDA count), NVLink multicast off, and SIGTERM sent to it if the sweep
process dies (Linux: PR_SET_PDEATHSIG). Its output goes to ``point_logs/<point>.log`` in the sweep directory.

Only this process writes sweep_log.jsonl (one line per start and per end of a point, with its GPU group). A
point that fails is a result, as in a serial sweep. Ctrl-C or SIGTERM sends the same signal to every running
point, waits for each to write its INTERRUPTED record (up to INTERRUPT_GRACE_S), then kills what is left (its
whole session: the probe's workers too) and completes any record left unfinished from its checkpoint, so
every point ends complete or INTERRUPTED; a resume reruns the INTERRUPTED ones.

The loop (run_parallel) sees the points only through an executor: ``take``/``give`` a group, ``start`` a point,
and a run it can ``poll``, ``wait``, ``send_signal``, ``kill`` and ask for its ``crash_reason``. LocalExecutor
(this module: the pool above) is one; greta.sweeps.ray_executor.RayExecutor (Ray tasks) is the other
(docs/SWEEPS.md). Every record is verified when its point ends (greta.checks.verify).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from greta.record.params import ParamError
from greta.terminal import brief
from greta.sweeps.layout import log_entry, say, verdict_of

INTERRUPT_GRACE_S = 120.0  # how long an interrupted point may take to write its INTERRUPTED record
POINT_LOGS = "point_logs"   # each point process's stdout and stderr, in the sweep directory
EXIT_BAD_INPUT, EXIT_RECORD, EXIT_INTERRUPTED = 2, 3, 130  # greta.sweeps.point's exit codes


class _Term(KeyboardInterrupt):
    """SIGTERM to the sweep, turned into an exception in its main thread."""


def _on_term(signum, frame):
    raise _Term()


def pool_ids(matrix, gpus) -> list[str]:
    """The GPU ids the pool hands out (module docstring), after checking --gpus against the matrix and this
    machine. ParamError (one line) for a bad value."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ParamError(f"--gpus {gpus!r}: give how many GPUs the sweep may use at once, an integer >= 1 "
                         "(e.g. --gpus 4); leave it out to run the points one after another")
    devices = {p.device for p in matrix.points()}
    pinned = sorted(d for d in devices if d not in ("cpu", "cuda"))
    if pinned:
        raise ParamError(f"--gpus {gpus} with device={pinned[0]}: the sweep gives each point its own GPUs; "
                         "write -p device=cuda")
    widest = max(p.tp for p in matrix.points())
    if widest > gpus:
        raise ParamError(f"--gpus {gpus} is fewer than the tp={widest} GPUs a point of the matrix needs; "
                         f"use --gpus {widest} or more")
    if "cuda" not in devices:
        return [str(i) for i in range(gpus)]
    visible = _visible_gpus()
    named = [v for v in visible if not v.isdigit()]
    if named:
        raise ParamError(f"--gpus {gpus} with CUDA_VISIBLE_DEVICES naming {named[0]!r}: the points' VRAM samplers map "
                         "a group back to physical GPUs by index; list the GPUs by index (e.g. 0,1,2,3)")
    if gpus > len(visible):
        raise ParamError(f"--gpus {gpus} but this machine shows {len(visible)} GPU(s); use --gpus {len(visible) or 1}"
                         " or fewer")
    return visible[:gpus]


def _visible_gpus() -> list[str]:
    """This process's GPUs as CUDA_VISIBLE_DEVICES names them (0..n-1 when it is unset)."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [s.strip() for s in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if s.strip()]
    return listed[:n] if "CUDA_VISIBLE_DEVICES" in os.environ else [str(i) for i in range(n)]


def point_environ(group: list[str], base: dict | None = None) -> dict:
    """The environment of a point's process: its GPU group, PCI order, NVLink multicast off."""
    from greta.engine.launch import NO_MULTICAST

    env = dict(os.environ if base is None else base)
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    env.update({"CUDA_VISIBLE_DEVICES": ",".join(group), **NO_MULTICAST})
    return env


class Pool:
    """Free GPU ids; take(n) hands out the n lowest free ones (None while fewer are free)."""

    def __init__(self, ids: list[str]):
        self.ids, self.free = list(ids), list(ids)

    def take(self, n: int) -> list[str] | None:
        if len(self.free) < n:
            return None
        group, self.free = self.free[:n], self.free[n:]
        return group

    def give(self, group: list[str]) -> None:
        self.free = [i for i in self.ids if i in self.free or i in group]


class LocalRun:
    """A point's process on this machine: what the sweep loop asks of a running point on any executor
    (poll, wait, send_signal, kill, crash_reason; greta.sweeps.ray_executor.RayRun is the other one)."""

    node = None  # a point of this machine: no node to name

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.pid = proc, proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)  # subprocess.TimeoutExpired past the timeout

    def send_signal(self, sig: int) -> None:
        try:
            self.proc.send_signal(sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL to the point's session: its process and whatever of the probe's workers is left."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def crash_reason(self, rc: int) -> str:
        from greta.probe.ranks import exit_reason

        return f"the point's process ended with {exit_reason(rc)}"


class LocalExecutor:
    """Points as processes of this machine, one per free group of the pool's GPU ids (module docstring)."""

    name = "local"

    def __init__(self, ids: list[str]):
        self.pool = Pool(ids)

    def take(self, tp: int) -> list[str] | None:
        return self.pool.take(tp)

    def give(self, group: list[str]) -> None:
        self.pool.give(group)

    def start(self, sweep_dir: Path, name: str, group: list[str], tp: int) -> LocalRun:
        return LocalRun(start_point_process(sweep_dir, name, group))

    def where(self, group: list[str], device: str) -> str:
        return ("GPU " if device == "cuda" else "slot ") + ",".join(group)

    def close(self) -> None:
        pass


@dataclass
class _Point:
    number: int
    name: str
    group: list[str]
    proc: LocalRun
    started_utc: str
    t0: float


def _pdeathsig():
    """In the point's process before exec: SIGTERM when the sweep process dies (Linux), so a killed sweep
    leaves INTERRUPTED records, not orphans."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start_point_process(sweep_dir: Path, name: str, group: list[str], preexec=_pdeathsig) -> subprocess.Popen:
    """``python -m greta.sweeps.point <sweep dir> <name>`` in a session of its own, on its GPU group, its output
    appended to point_logs/<name>.log; preexec runs in it before exec (Linux)."""
    logs = sweep_dir / POINT_LOGS
    logs.mkdir(exist_ok=True)
    with open(logs / f"{name}.log", "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "greta.sweeps.point", str(sweep_dir), name],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=point_environ(group), start_new_session=True,
                                preexec_fn=preexec if sys.platform == "linux" else None)


def _start(executor, sweep_dir: Path, number: int, name: str, group: list[str], tp: int) -> _Point:
    from greta.record.store import _now

    return _Point(number, name, group, executor.start(sweep_dir, name, group, tp), _now(), time.monotonic())


def _where(executor, group: list[str], matrix, name: str) -> str:
    return executor.where(group, matrix.params[name].device)


def _last_line(path: Path) -> str:
    try:
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return brief(lines[-1]) if lines else ""


def _ended(executor, matrix, sweep_dir: Path, p: _Point, total: int, progress: bool, how: str | None = None) -> int:
    """A point's process has ended: its record completed if it was left unfinished, verified on arrival, the
    log line, the progress line. Returns the process's exit code (None: a queued point that never started)."""
    from greta.probe.runner import finish_from_checkpoint

    rc = p.proc.wait()
    p.proc.kill()
    d = sweep_dir / "points" / p.name
    if rc is None:
        return None
    if rc not in (EXIT_BAD_INPUT, EXIT_RECORD) and (how or rc != 0) and not (d / "manifest.json").is_file():
        status, why = ("interrupted", how) if how else ("crash", p.proc.crash_reason(rc))
        try:
            finish_from_checkpoint(d, matrix.params[p.name], status, why)
        except Exception as e:  # noqa: BLE001 - logged as the point's error below; the other points go on
            with open(sweep_dir / POINT_LOGS / f"{p.name}.log", "a", encoding="utf-8") as f:
                f.write(f"\nthe sweep could not complete the record: {type(e).__name__}: {e}\n")
    where, wall = _where(executor, p.group, matrix, p.name), time.monotonic() - p.t0
    node = {"node": p.proc.node} if p.proc.node else {}
    where += f" on node {p.proc.node}" if p.proc.node else ""
    verdict, reason = verdict_of(d)
    damaged = _arrival_problems(d) if verdict is not None else []
    if rc in (EXIT_BAD_INPUT, EXIT_RECORD) or verdict is None or damaged:
        msg = (brief(f"the record failed verification on arrival: {damaged[0]}") if damaged else
               _last_line(sweep_dir / POINT_LOGS / f"{p.name}.log") or f"exit code {rc}")
        say(progress, f"[{p.number}/{total}] {p.name}: error ({where}, {wall:.1f} s): {msg}")
        log_entry(sweep_dir, point=p.name, action="error", error=msg, gpus=p.group, started_utc=p.started_utc,
                  **node)
    else:
        say(progress, f"[{p.number}/{total}] {p.name}: {verdict} ({where}, {wall:.1f} s)")
        log_entry(sweep_dir, point=p.name, action="ran", verdict=verdict, reason=reason, gpus=p.group,
                  started_utc=p.started_utc, **node)
    return rc


def _arrival_problems(d: Path) -> list[str]:
    """What greta.checks.verify finds wrong with a point's record as it reaches the sweep directory."""
    from greta.checks.verify import verify

    return verify(d, allow_missing_large=False)


def run_parallel(matrix, sweep_dir: Path, todo, total: int, executor, progress: bool,
                 grace_s: float = INTERRUPT_GRACE_S) -> None:
    """Run todo's points (number, point), as many at a time as the executor's groups allow (module docstring);
    executor: LocalExecutor, or greta.sweeps.ray_executor.RayExecutor. Raises ProbeInterrupted after an
    interrupt, RecordError when a point could not write its record."""
    pool, queue, running = executor, list(todo), []
    record_error = None
    main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _on_term) if main_thread else None
    try:
        while queue or running:
            while queue and record_error is None:
                number, pt = queue[0]
                tp = matrix.params[pt["name"]].tp
                group = pool.take(tp)
                if group is None:
                    break
                queue.pop(0)
                running.append(_start(executor, sweep_dir, number, pt["name"], group, tp))
                where = _where(executor, group, matrix, pt["name"])
                say(progress, f"[{number}/{total}] {pt['name']}: running on {where}")
                log_entry(sweep_dir, point=pt["name"], action="started", gpus=group, pid=running[-1].proc.pid)
            if record_error is not None and not running:
                break
            time.sleep(0.2)
            for p in [p for p in running if p.proc.poll() is not None]:
                running.remove(p)
                pool.give(p.group)
                if _ended(executor, matrix, sweep_dir, p, total, progress) == EXIT_RECORD:
                    record_error = record_error or _last_line(sweep_dir / POINT_LOGS / f"{p.name}.log")
    except KeyboardInterrupt as e:
        _interrupt(executor, matrix, sweep_dir, running, total, progress, e, grace_s, queue)
    finally:
        executor.close()
        if main_thread:
            signal.signal(signal.SIGTERM, old_term)
    if record_error is not None:
        from greta.record.store import RecordError

        raise RecordError(record_error)


def _interrupt(executor, matrix, sweep_dir: Path, running: list, total: int, progress: bool, e: KeyboardInterrupt,
               grace_s: float, queue: list):
    """Ctrl-C / SIGTERM: the same signal to every running point, their INTERRUPTED records awaited (grace_s),
    then every session killed and any unfinished record completed from its checkpoint."""
    from greta.probe.runner import ProbeInterrupted

    how, sig = ("SIGTERM", signal.SIGTERM) if isinstance(e, _Term) else ("SIGINT (Ctrl-C)", signal.SIGINT)
    say(progress, f"{how}: stopping {len(running)} running point(s)")
    for p in running:
        p.proc.send_signal(sig)
    end = time.monotonic() + grace_s
    try:
        for p in running:
            p.proc.wait(max(0.0, end - time.monotonic()))
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        pass  # past the grace, or a second Ctrl-C: kill them now
    for p in running:
        p.proc.kill()
        _ended(executor, matrix, sweep_dir, p, total, progress, how=f"the sweep was interrupted by {how}")
    first = running[0].name if running else (queue[0][1]["name"] if queue else "-")
    raise ProbeInterrupted(sweep_dir / "points" / first, how) from None
