"""The one audit pipeline: `greta audit` and `papermill notebooks/run_b3_77.ipynb out.ipynb` (or any probe
kind's run notebook, greta.probe.kinds) both end here.

    run_dir = run_audit(load_params("params/cpu_default.yaml", {"ctx": 512}))

run_audit allocates a fresh record directory and executes the kind's run notebook into it with papermill (the kernel
runs the probe and the analysis notebooks: :func:`run_stage`). Papermill writes the executed notebook only when
it ends, so the launching process completes the record: a fault record from the probe's checkpoints if the
kernel died, INTERRUPTED if it was interrupted (the analysis notebooks included), HTML of every notebook with
the verdict first, and the seal (manifest.json) as the very last write. Run bare, the notebook itself is the
launcher: with no run_dir it calls run_audit, which executes the notebook again into the record.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

from greta.paths import record_name
from greta.probe.kinds import kind_of
from greta.probe.preflight import preflight
from greta.probe.runner import ProbeInterrupted, finish_from_checkpoint, run_probe
from greta.record.files import Verdict, read_record
from greta.record.params import ParamError, Params, params_from_notebook
from greta.record.store import RecordError, atomic_write_text, new_probe_dir, seal
from greta.reports import md, notebooks as nbs
from greta.reports.notebook_params import papermill_syntax
from greta.terminal import shown

ANALYSIS = "the analysis notebooks"


def run_notebook(params: Params) -> str:
    """The run notebook of the probe kind params name."""
    return kind_of(params).run_notebook


def notebook_params(params_file, overrides: dict | None, **named):
    """The run notebook's parameters through the one validator (greta.record.params.params_from_notebook:
    unknown names refused, None keeps the file's value), then this machine's preflight, as the CLI does; a
    refusal's hint in papermill's syntax (`-p ctx 4096`), the notebook's way of taking params."""
    try:
        return preflight(params_from_notebook(params_file, overrides, **named))
    except ParamError as e:
        raise ParamError(papermill_syntax(str(e))) from None


def run_stage(params: Params, run_dir=None, out_root=None, show_code: bool = False) -> Path:
    """What the run notebook's kernel does. Given run_dir (by run_audit): the probe, then the analysis
    notebooks, into it. Without (papermill run bare): the whole audit, this notebook executed again into a
    fresh sealed record, ending on papermill's terminal as `greta audit` ends; its directory is returned
    either way."""
    if run_dir is None:  # "outputs" (the default) is the checkout's folder, from notebooks/ too
        try:
            done = run_audit(params, out_root=out_root, progress=False, show_code=show_code)
        except ProbeInterrupted as e:
            to_terminal(f"greta: INTERRUPTED by {e.how}; record: {e.run_dir}")
            raise
        to_terminal(*closing_lines(done))
        return done
    run_dir = Path(run_dir).resolve()  # "." from run_audit: the kernel runs in the record's folder
    run_probe(params, run_dir=run_dir, progress=True)
    at_boundary("probe")
    nbs.execute_analysis(run_dir, names=kind_of(params).analysis_notebooks,
                         then=lambda name: at_boundary(f"notebook:{name}"))
    return run_dir


# A test's deterministic Ctrl-C: with GRETA_TEST_INTERRUPT_AT=<boundary> ("probe": the probe has sealed its
# verdict; "notebook:<name>": that analysis notebook and its page are written), the kernel that reaches it
# sends SIGINT to the audit that started it, as a terminal's Ctrl-C does, and waits for it to come back.
INTERRUPT_AT_ENV = "GRETA_TEST_INTERRUPT_AT"


def at_boundary(name: str) -> None:
    """A boundary between two steps of the run notebook's kernel (see INTERRUPT_AT_ENV)."""
    import time

    if os.environ.get(INTERRUPT_AT_ENV) != name:
        return
    os.kill(os.getppid(), signal.SIGINT)  # the audit forwards it to this kernel: KeyboardInterrupt below
    time.sleep(60)


def closing_lines(run_dir) -> tuple[str, str]:
    """How a run ends on the terminal (greta audit / probe, bare papermill): its verdict, then its record."""
    v = Verdict.read(Path(run_dir))
    return shown(f"{v.verdict}: {v.reason}"), shown(f"record: {run_dir}")  # a reason can quote outside text


def to_terminal(*lines: str) -> None:
    """Write lines to the standard output of the process that started this kernel: the terminal of
    `papermill ...` (ipykernel sends sys.stdout to the notebook; its fileno() is the original standard output,
    which it keeps; without that, sys.__stdout__ is it). On a terminal the lines start on a line of their own,
    below papermill's progress bar. Outside a kernel it is plain standard output."""
    for stream in (sys.stdout, sys.__stdout__):
        try:
            fd = stream.fileno()
            lead = "\n" if os.isatty(fd) else ""
            os.write(fd, (lead + "".join(line + "\n" for line in lines)).encode("utf-8", "replace"))
            return
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: no file behind this stream
            continue


class _Interrupts:
    """While a notebook runs: Ctrl-C / SIGTERM are passed on to the kernel (it runs in its own session, so the
    terminal's Ctrl-C does not reach it), where the probe or the notebook answers them; here they are only noted,
    so no KeyboardInterrupt tears papermill down mid-write."""

    def __init__(self):
        self.how, self.finishing = None, False

    def _forward(self, signum, frame):
        import psutil

        if self.finishing:  # completing and sealing the record takes seconds: a second Ctrl-C must not tear it
            return
        self.how = self.how or ("SIGTERM" if signum == signal.SIGTERM else "SIGINT (Ctrl-C)")
        for child in psutil.Process().children():
            try:
                if "ipykernel" in " ".join(child.cmdline()):
                    os.kill(child.pid, signum)  # the probe there answers SIGINT and SIGTERM with its own record
            except (psutil.Error, ProcessLookupError, PermissionError):
                pass

    def __enter__(self):
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self._forward) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in (self.old or {}).items():
            signal.signal(s, h)


class _Progress:
    """Live progress on the terminal (stderr) from the lines the kernel appends to a progress file."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.stop = threading.Event()

    def __enter__(self):
        self.dir = tempfile.TemporaryDirectory(prefix="greta-progress-")
        self.path = Path(self.dir.name) / "progress"
        self.path.touch()
        self.old_env = os.environ.get(nbs.PROGRESS_ENV)
        os.environ[nbs.PROGRESS_ENV] = str(self.path)  # the kernel, and the kernels it starts, inherit it
        self.thread = threading.Thread(target=self._tail, daemon=True, name="greta-progress")
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)
        if self.old_env is None:
            os.environ.pop(nbs.PROGRESS_ENV, None)
        else:
            os.environ[nbs.PROGRESS_ENV] = self.old_env
        self.dir.cleanup()

    def _tail(self):
        bar, key = None, None
        with open(self.path, encoding="utf-8") as f:
            while True:
                line = f.readline()
                if not line:
                    if self.stop.wait(0.2):
                        break
                    continue
                bar, key = self._show(line.split(), bar, key)
        if bar is not None:
            bar.close()

    def last_step(self) -> list[str]:
        """The fields of the last line the kernel wrote ([] before any): where it was when the run ended."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        return lines[-1].split() if lines else []

    def _show(self, fields, bar, key):
        """One progress line: "phase <name> <done> <total> <unit> [<how it ended>]" (greta.probe.runner) or
        "notebook <name | done> <done> <total>" (greta.reports.notebooks)."""
        if not self.enabled or len(fields) < 4:
            return bar, key
        from tqdm import tqdm

        kind, name, done, total = fields[0], fields[1], int(fields[2]), int(fields[3])
        unit = fields[4] if kind == "phase" and len(fields) > 4 else "notebook"
        status = fields[5] if kind == "phase" and len(fields) > 5 else None
        if kind == "notebook":
            name = "analysis notebooks" if name == "done" else f"notebook {name}"
        if key != (kind, name if kind == "phase" else "notebooks"):
            if bar is not None:
                bar.close()
            bar = tqdm(total=total, desc=name if kind == "phase" else "notebooks", file=sys.stderr)
            key = (kind, name if kind == "phase" else "notebooks")
        if kind == "notebook" or status:
            bar.set_postfix_str(status or name, refresh=False)
        bar.unit = unit
        bar.total = total  # a phase starts as 0/1 until its first step says how many; it ends at 100% or says how
        bar.n = done
        bar.refresh()
        return bar, key


def run_audit(params: Params, out_root=None, progress: bool = True, show_code: bool = False) -> Path:
    """Execute run_b3_77.ipynb into a fresh record directory, complete it and seal it (the module docstring).
    params: validated (load_params). Raises ProbeInterrupted (after sealing) if interrupted."""
    run_dir = new_probe_dir(out_root, params)
    out = run_dir / run_notebook(params)
    with _Interrupts() as intr, _Progress(progress) as progress_bar:
        try:
            err = nbs.execute_notebook(nbs.notebook_path(run_notebook(params)), out,
                                       dict(params_file=None, overrides=_plain(params), run_dir=record_name(run_dir, run_dir)),
                                       timeout_s=None)
        except KeyboardInterrupt:  # not forwarded (e.g. the audit runs off the main thread): papermill gave up
            err, intr.how = None, intr.how or "SIGINT (Ctrl-C)"
        intr.finishing = True
        complete_or_say_what_was_lost(run_dir, params, err, intr.how, show_code, progress_bar.last_step())
    if intr.how:
        raise ProbeInterrupted(run_dir, intr.how)
    return run_dir


def _plain(params: Params) -> dict:
    """The params as plain JSON data for a papermill parameter (they go through load_params again there)."""
    return params.to_dict()


def complete_or_say_what_was_lost(run_dir: Path, params: Params, err, interrupted, show_code, step) -> None:
    """complete_record; a write it cannot make (a full or read-only disk) ends the audit in one line
    (RecordError: exit 2) that names the file and says what became of the record (:func:`_salvage`)."""
    try:
        complete_record(run_dir, params, err, interrupted, show_code, step)
        return
    except OSError as e:
        failed = (e.strerror or str(e)) + (f" writing {Path(e.filename).name}" if e.filename else "")
    raise RecordError(f"could not complete the record in {run_dir} ({failed}); {_salvage(run_dir, params)}")


def _salvage(run_dir: Path, params: Params) -> str:
    """Seal what was written if it is a consistent record (then it verifies, lacking only what could not be
    written); otherwise leave it unsealed, which no check takes for complete. -> what became of it."""
    from greta.checks.verify import verify

    try:
        seal(run_dir, params.to_dict())
    except OSError:
        return _unsealed(run_dir, "")
    problems = verify(run_dir)
    if not problems:
        return "what was written is sealed and verifies, without the file named"
    return _unsealed(run_dir, f"what was written is not a consistent record ({problems[0]}), so ")


def _unsealed(run_dir: Path, why: str) -> str:
    """Take the seal away (the probe sealed its part before the notebooks ran) so the record does not pass as
    complete; -> the sentence saying so."""
    try:
        (run_dir / "manifest.json").unlink(missing_ok=True)
    except OSError:  # read-only: the probe's manifest stays, and lists none of the notebooks' files
        return (f"{why}its manifest.json is the probe's, from before the notebooks, so greta verify names every "
                "file written since: make the folder writable and rerun")
    return f"{why}it is left without manifest.json, so it does not pass as complete: free space (or make it writable) and rerun"


def complete_record(run_dir: Path, params: Params, err: Exception | None, interrupted: str | None,
                    show_code: bool = False, step: list[str] | None = None) -> None:
    """After the run notebook: the verdict that covers what happened, HTML of each notebook, then the seal.
    step: the last progress line of the kernel (where an interrupt found it)."""
    if err is not None and not interrupted:
        print(shown(f"greta: {run_notebook(params)} failed: {nbs.one_line(err)} (kept: {run_dir / run_notebook(params)})"),
              file=sys.stderr)
    if not (run_dir / "verdict.json").is_file():  # the kernel died (or was torn down) before the probe ended
        status, how = (("interrupted", f"interrupted by {interrupted}") if interrupted else
                       ("crash", f"the notebook kernel died ({nbs.one_line(err) if err else 'no error reported'})"))
        finish_from_checkpoint(run_dir, params, status, how)
    elif interrupted:
        _mark_interrupted_after_probe(run_dir, params, interrupted, step or [])
    verdict = Verdict.read(run_dir)
    _mark_notebooks(run_dir, verdict)
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    for nb in sorted(run_dir.glob("*.ipynb")):
        try:
            nbs.to_html(nb, lead_md=_lead(nb, params, report, verdict), show_code=show_code, verdict=verdict.verdict)
        except OSError:
            raise  # the disk, not the page: complete_or_say_what_was_lost says what was lost
        except Exception as exc:  # noqa: BLE001 - the record stands without this page
            print(shown(f"greta: rendering {nb.name} to HTML failed: {nbs.one_line(exc)}"), file=sys.stderr)
    seal(run_dir, params.to_dict())


def _lead(nb: Path, params: Params, report: str, verdict) -> str:
    """What a page shows first: report.md, once. The run notebook shows report.md itself when it ran to the
    end, so its page opens with the verdict alone."""
    if nb.name == run_notebook(params) and nbs.is_complete(nb):
        return md.line("Verdict:", md.bold(verdict.verdict), "—", verdict.reason)
    return report


def _mark_notebooks(run_dir: Path, verdict: Verdict) -> None:
    """A notebook that did not run to its end gets a banner saying so; after an interrupt that came once the
    probe had finished, a notebook stating the probe's verdict is marked as stating it from before (its mark
    and banner: greta.reports.notebooks.mark_stale), so no page reads as if the run had completed."""
    probe = verdict.extra.get("probe_verdict") if verdict.verdict == "INTERRUPTED" else None
    for nb in sorted(run_dir.glob("*.ipynb")):
        if not nbs.is_complete(nb):
            nbs.mark_unfinished(nb, verdict.verdict, verdict.reason)
        if probe and nbs.states_verdict(nb):
            nbs.mark_stale(nb, verdict.verdict, verdict.reason, probe)


def interrupted_step(step: list[str], names: tuple[str, ...]) -> str:
    """Which step of the kernel an interrupt that came after the probe found running, from the kernel's last
    progress line ("notebook <name> <done> <total>", greta.reports.notebooks.execute_analysis)."""
    if len(step) < 3 or step[0] != "notebook":
        return f"after the probe finished, before {ANALYSIS} ({', '.join(names)})"
    name, done = step[1], int(step[2]) if step[2].isdigit() else 0
    if name == "done" or done >= len(names):
        return f"after {ANALYSIS} ({', '.join(names)}) had finished, while the run notebook showed its report"
    if name in names and done > names.index(name):
        return f"after {name} finished, before {names[done]}"
    return f"during the analysis notebook {name}" + (f" ({', '.join(names[:done])} had finished)" if done else "")


def _mark_interrupted_after_probe(run_dir: Path, params: Params, how: str, step: list[str]) -> None:
    """The probe finished and sealed its verdict, then an interrupt came: the record is INTERRUPTED (failed
    phase "analysis"), its reason naming the step it found running and keeping the probe's verdict;
    report.md re-rendered."""
    rec = read_record(run_dir)
    v = rec.verdict.to_dict()
    if v["verdict"] == "INTERRUPTED":
        return
    where = interrupted_step(step, kind_of(params).analysis_notebooks)
    v.update({"verdict": "INTERRUPTED", "failed_phase": "analysis", "probe_verdict": v["verdict"],
              "reason": f"interrupted by {how} {where}; the probe had finished: {v['verdict']} ({v['reason']})"})
    atomic_write_text(run_dir / "verdict.json", json.dumps(v, indent=2) + "\n")
    atomic_write_text(run_dir / "report.md", kind_of(params).render(
        params.to_dict(), rec.metadata.to_dict(), rec.perf.to_dict(), rec.metrics.to_dict() if rec.metrics else None,
        rec.vram.to_dict(), v))
