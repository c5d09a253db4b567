"""Execute notebooks with papermill, quietly, and render them to self-contained HTML pages.

The notebooks themselves (``notebooks/*.ipynb``) are thin: they read one run directory (docs/RECORD.md) and
call :mod:`greta.reports.plots`. They ship with the repository checkout, not inside the installed package.
The audit pipeline that strings them together is :mod:`greta.audit`.
"""

from __future__ import annotations

import functools
import html
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

__all__ = ["NOTEBOOK_DIR", "REPO_ROOT", "ANALYSIS_NOTEBOOKS", "PROGRESS_ENV", "NotebooksMissing",
           "notebook_path", "execute_notebook", "execute_analysis", "to_html", "is_complete", "mark_unfinished",
           "report_progress", "one_line", "NoRecord", "newest_record", "figure_path"]

from greta.paths import NOTEBOOK_DIR, REPO_ROOT, record_name
from greta.record.files import atomic_write_bytes, atomic_write_text
from greta.reports import md
from greta.reports.verdict_marks import mark_superseded, notebook_verdicts, page_head, superseded
from greta.terminal import brief, shown

ANALYSIS_NOTEBOOKS = ("vram_plot.ipynb", "equivalence_analysis.ipynb")
KERNEL = "python3"
# A file that the process showing progress (greta audit) tails: the probe's phases and each notebook append
# one line per step, so the notebooks themselves store no progress bars.
PROGRESS_ENV = "GRETA_PROGRESS_FILE"


class NotebooksMissing(FileNotFoundError):
    """The notebooks/ folder is not where the package expects it."""


def notebook_path(name: str) -> Path:
    """``NOTEBOOK_DIR / name``; a one-line error if the folder isn't there."""
    if not NOTEBOOK_DIR.is_dir():
        raise NotebooksMissing(
            f"{NOTEBOOK_DIR} not found: the notebooks ship with the repository checkout "
            "(install greta editable from a clone: pip install -e .)")
    path = NOTEBOOK_DIR / name
    if not path.is_file():
        raise NotebooksMissing(f"{path} not found in the repository checkout")
    return path


class NoRecord(FileNotFoundError):
    """A notebook run with its default parameters found no record to open. In a notebook it shows as its one
    line (IPython's _render_traceback_), which says what to set."""

    def _render_traceback_(self):
        return [f"{type(self).__name__}: {self}"]


def newest_record(given, kind: str = "b3_77", marker: str = "params.json", param: str = "run_dir") -> Path:
    """``given`` when it is set; else the newest record of ``kind`` (<day>/<kind>/<run-id> holding ``marker``;
    kind may be a glob such as "*-sweep")
    under the checkout's outputs/, so an analysis notebook opened in Lab runs with its default parameters."""
    from greta.paths import OUTPUTS

    if given:  # "." from a pipeline (the kernel runs in the record): the record's own path, for the code to open
        return Path(given).resolve()
    found = sorted((p.parent for p in OUTPUTS.glob(f"*/{kind}/*/{marker}")), key=lambda d: (d.parent.parent.name, d.name))
    if not found:  # kind may be a glob ("*-sweep": a sweep of any probe)
        raise NoRecord(f"no {kind.replace('*-', '')} record under {OUTPUTS}: set {param} = \"<a record directory>\" in the parameters "
                       "cell, or make one first (python -m greta audit)")
    return found[-1]


def figure_path(record_dir, name: str, into_record: bool) -> Path:
    """Where a notebook saves figure ``name`` of a record. The pipelines that make a record (audit, sweep)
    run its notebooks with ``into_record=True``: the figure is one of the record's files. Opened by a person
    (JupyterLab, papermill by hand) a notebook only looks, so the figure goes to a scratch folder of this
    process, removed when it exits (the notebook embeds the image it shows): a sealed record must never change
    because someone viewed it."""
    if into_record:
        return Path(record_dir) / name
    scratch = _scratch_folder() / Path(record_dir).name
    scratch.mkdir(parents=True, exist_ok=True)
    return scratch / name


@functools.lru_cache(maxsize=None)
def _scratch_folder() -> Path:
    """This process's folder for figures nobody keeps (figure_path), removed at exit."""
    import atexit
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix=f"greta-figures-{os.getpid()}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def report_progress(kind: str, *fields) -> None:
    """Append one progress line ("<kind> <fields...>") for the process that shows progress; no-op without one."""
    path = os.environ.get(PROGRESS_ENV)
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(" ".join(str(x) for x in (kind, *fields)) + "\n")
    except OSError:  # progress is a courtesy: never let it fail a run
        pass


def one_line(exc: BaseException) -> str:
    """An exception as one line; papermill's PapermillExecutionError names the real error on its last line."""
    text = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return brief(f"{type(exc).__name__}: {text[-1] if text else ''}")


def _kernel_manager():
    """A kernel manager for one notebook run that leaves nothing behind (:meth:`stop`), its kernel's own stderr
    (the TCP-without-encryption warning, shutdown noise) sent to /dev/null: what the kernel's code prints still
    reaches the notebook through Jupyter's channels."""
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.utils import run_sync

    class OneRunKernelManager(AsyncKernelManager):
        def __init__(self, **kw):
            super().__init__(**kw)
            self._gate, self._stopped, self._settled = threading.Lock(), False, threading.Event()
            self._settled.set()

        async def start_kernel(self, **kw):
            with self._gate:
                if self._stopped:
                    raise RuntimeError("the notebook run was stopped before its kernel started")
                self._settled.clear()
            kw.setdefault("stderr", subprocess.DEVNULL)
            kw.setdefault("stdout", subprocess.DEVNULL)
            try:
                return await super().start_kernel(**kw)
            finally:
                self._settled.set()

        def stop(self, now: bool) -> None:
            """Shut the kernel down and remove its connection file (it holds the kernel's HMAC key, in $TMPDIR).
            papermill does neither for a manager it was handed, nor for one interrupted while its kernel was
            starting. Inside a notebook kernel (the analysis notebooks of an audit) papermill's coroutines run
            on a thread of their own, so an interrupted start goes on there: wait for it to settle first, and
            let no start begin after this. ``now``: kill the kernel rather than ask it to exit."""
            with self._gate:
                self._stopped = True
            self._settled.wait(60)
            try:
                if self.has_kernel:
                    run_sync(self.shutdown_kernel)(now=now)
            finally:
                self.cleanup_connection_file()

    return OneRunKernelManager(kernel_name=KERNEL)


class _Terminated(KeyboardInterrupt):
    """SIGTERM while a notebook ran in a process that had no handler of its own for it."""


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises _Terminated (a KeyboardInterrupt) while a notebook runs, where it would otherwise kill this
    process outright (a notebook kernel running the analysis notebooks: an audit forwards its SIGTERM there):
    papermill then shuts the notebook's kernel down and removes its connection file on the way out, as on
    Ctrl-C. A process that handles SIGTERM itself (greta audit forwards it) keeps its handler."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def interrupt(signum, frame):
        raise _Terminated("SIGTERM")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


ATOMIC_SCHEME = "greta-atomic:"


@functools.lru_cache(maxsize=None)
def _atomic_papermill_io() -> str:
    """The scheme under which papermill writes an output notebook atomically (each save: a temp file beside it,
    then a rename), so a disk that fills mid-run leaves the last whole notebook, never a truncated one."""
    from papermill.iorw import LocalHandler, papermill_io

    class AtomicLocalHandler(LocalHandler):
        def write(self, buf, path):
            atomic_write_bytes(Path(path[len(ATOMIC_SCHEME):]), buf.encode("utf-8"))

    papermill_io.register(ATOMIC_SCHEME, AtomicLocalHandler())
    return ATOMIC_SCHEME


@functools.lru_cache(maxsize=None)
def _record_names_engine() -> str:
    """The papermill engine that stores the names a record gives the source and the output notebook
    (greta.paths.record_name) in the notebook's metadata, where papermill would store their absolute paths:
    set before the notebook's first save, so no saved copy names the machine's folders."""
    from papermill.engines import NBClientEngine, papermill_engines

    class RecordNamesEngine(NBClientEngine):
        @classmethod
        def execute_notebook(cls, nb, kernel_name, record_names=None, **kwargs):
            nb.metadata.papermill.update(record_names or {})
            return super().execute_notebook(nb, kernel_name, **kwargs)

    papermill_engines.register("greta-record", RecordNamesEngine)
    return "greta-record"


def execute_notebook(src: str | Path, out: str | Path, parameters: dict,
                     timeout_s: float | None = 600) -> Exception | None:
    """Run ``src`` with papermill into ``out``, its kernel's stderr silenced; the kernel is shut down and its
    connection file removed when the notebook ends, however it ends. The kernel runs in ``out``'s folder (the
    record, as Jupyter runs a notebook beside it), so ``parameters`` name the record and its files relative to
    it (``run_dir="."``: greta.paths.record_name) and the executed notebook names no folder of this machine.

    Returns the exception instead of raising: papermill has already written the partially executed notebook
    (with the error output) to ``out`` by then. ``timeout_s`` bounds each cell, so a hung kernel cannot hang
    the caller. An interrupt (KeyboardInterrupt) is not an error of the notebook: it propagates.
    """
    import papermill as pm

    logging.getLogger("papermill").setLevel(logging.ERROR)  # "Input notebook does not contain a cell with tag..."
    km, interrupted = _kernel_manager(), True
    try:
        with _sigterm_as_interrupt():
            out = Path(out).resolve()
            pm.execute_notebook(str(src), _atomic_papermill_io() + str(out), parameters=parameters, kernel_name=KERNEL,
                                progress_bar=False, cwd=str(out.parent), execution_timeout=timeout_s, km=km,
                                engine_name=_record_names_engine(),
                                record_names={"input_path": record_name(src), "output_path": out.name})
        interrupted = False
    except Exception as exc:  # noqa: BLE001 - the caller must never abort on a notebook
        interrupted = False
        return exc
    finally:
        km.stop(now=interrupted)  # a kernel that ran to its end (or to an error) exits by itself, running its atexit
    return None


def is_complete(nb_path: str | Path) -> bool:
    """Every code cell of an executed notebook ran (has an execution count) and ended without an error output."""
    import nbformat

    nb = nbformat.read(str(nb_path), as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        status = cell.get("metadata", {}).get("papermill", {}).get("status")
        # papermill marks every cell "completed" when its kernel goes away; a cell that ran has an execution count
        if cell.get("execution_count") is None or status not in (None, "completed") or any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
            return False
    return True


def mark_unfinished(nb_path: str | Path, verdict: str, reason: str) -> None:
    """Put a banner on a notebook that did not run to completion (papermill marks unrun cells as if they had
    completed after a dead kernel), so nobody reads it as a complete one."""
    import nbformat

    nb = nbformat.read(str(nb_path), as_version=4)
    if nb.cells and "did not run to completion" in nb.cells[0].get("source", ""):
        return
    nb.cells.insert(0, nbformat.v4.new_markdown_cell(
        f"# ⚠ {verdict}: {reason}\n\nThis notebook did not run to completion: the cells below the point where it "
        "stopped did not run, whatever their execution marks say. The record's verdict.json and report.md say "
        "what happened."))
    write_notebook(nb, nb_path)


def write_notebook(nb, nb_path: str | Path) -> None:
    """An nbformat notebook to nb_path atomically: the file is the old notebook or the new one, never half."""
    import nbformat

    text = nbformat.writes(nb)
    atomic_write_text(Path(nb_path), text if text.endswith("\n") else text + "\n")


def states_verdict(nb_path: str | Path) -> bool:
    """Whether a notebook's outputs state a verdict through its mark (greta.reports.verdict_marks)."""
    import nbformat

    return bool(notebook_verdicts(nbformat.read(str(nb_path), as_version=4)))


def mark_stale(nb_path: str | Path, verdict: str, reason: str, stated: str) -> None:
    """A notebook that ran to its end before its record's verdict became ``verdict`` (an interrupt after the
    probe: INTERRUPTED) states the probe's verdict ``stated``: a banner says so, and its metadata carries the
    mark greta verify reads (greta.reports.verdict_marks.mark_superseded)."""
    import nbformat

    nb = nbformat.read(str(nb_path), as_version=4)
    if superseded(nb):
        return
    mark_superseded(nb, verdict, stated)
    nb.cells.insert(0, nbformat.v4.new_markdown_cell(
        md.heading(1, "⚠ ", verdict, ": ", reason) + "\n\n" + md.line(
            f"This notebook ran before the record became {verdict}: the verdict it states below ({stated}) is the "
            "probe's, from before the interruption. The record's verdict.json and report.md say what happened.")))
    write_notebook(nb, nb_path)


def execute_analysis(run_dir: str | Path, timeout_s: float | None = 600,
                     names: tuple[str, ...] = ANALYSIS_NOTEBOOKS, then=None) -> list[Path]:
    """Execute the VRAM and equivalence notebooks (or those `names` lists) into ``run_dir``, plus HTML of each.

    A notebook that fails is still kept (papermill writes it with the error) and still rendered; the failure
    is reported on stderr and the next notebook runs. Returns the paths written: ``<nb>.ipynb`` and
    ``<nb>.html`` for each notebook. Only a missing ``notebooks/`` folder raises (:class:`NotebooksMissing`).
    Each notebook's progress line is written before it runs and again (its count done) once it and its page
    are written; ``then(name)``, if given, is called at that point.
    """
    run_dir = Path(run_dir).resolve()
    sources = [notebook_path(name) for name in names]
    written: list[Path] = []
    for i, src in enumerate(sources):
        report_progress("notebook", src.name, i, len(sources))
        out = run_dir / src.name
        err = execute_notebook(src, out, dict(run_dir=record_name(run_dir, run_dir), into_record=True), timeout_s=timeout_s)
        if err is not None:
            print(shown(f"greta: {src.name} failed: {one_line(err)} (kept: {out})"), file=sys.stderr)
        if out.is_file():
            written.append(out)
            try:
                written.append(to_html(out))
            except Exception as exc:  # noqa: BLE001
                print(shown(f"greta: rendering {out.name} to HTML failed: {one_line(exc)}"), file=sys.stderr)
        report_progress("notebook", src.name, i + 1, len(sources))
        if then is not None:
            then(src.name)
    report_progress("notebook", "done", len(sources), len(sources))
    return written


# --- the one HTML exporter (audit, sweep and oracle pages) ---------------------------------------------------

# Small and local on purpose: nbconvert's lab template carries 257 KiB of CSS on every page and loads
# require.js and MathJax from a CDN; a record's pages must open offline.
_CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#1a1a1a}
h1,h2,h3{line-height:1.25}table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}code,pre{font:13px/1.4 ui-monospace,Menlo,Consolas,monospace}pre{background:#f7f7f7;padding:.6em;overflow-x:auto}
img{max-width:100%;height:auto}.greta-lead{border:2px solid #444;border-radius:6px;padding:.2em 1em;margin-bottom:2em}
.input_area pre{border-left:3px solid #9ab}.prompt{display:none}.output_stderr pre{background:#fdd}
.verdict{display:inline-block;padding:.05em .55em;border-radius:4px;font-weight:700;color:#fff;background:#616161}
.verdict-pass{background:#2e7d32}.verdict-fail{background:#c62828}.verdict-drift{background:#ffb300;color:#1a1a1a}
.verdict-pass::before{content:"✓ "}.verdict-fail::before{content:"✗ "}.verdict-drift::before{content:"~ "}
"""
# `Verdict: <strong>X</strong>` as the pages state it (greta.checks.statements reads it, the class included)
_VERDICT_HTML = re.compile(r"(Verdict(?: from the trace)?:\s*)<strong>([A-Za-z][A-Za-z0-9_]*)</strong>")
_DEFAULT_ALT = "No description has been provided for this image"


def verdict_class(verdict: str) -> str:
    """The badge's colour class: PASS green, FAIL red, DRIFT amber, anything else (INTERRUPTED, INCOMPLETE) grey.
    The verdict's text stays in the badge, with a mark before it: the colour is never all it says."""
    if verdict.startswith("PASS"):
        return "verdict-pass"
    if verdict.endswith("DRIFT"):
        return "verdict-drift"
    return "verdict-fail" if verdict.startswith("FAIL") else "verdict-other"


def verdict_badges(page: str) -> str:
    """Every `Verdict: <strong>X</strong>` of a page as a coloured badge (its text unchanged)."""
    return _VERDICT_HTML.sub(lambda m: f'{m[1]}<strong class="verdict {verdict_class(m[2])}">{m[2]}</strong>', page)


def _image_alts(nb) -> list[str]:
    """Alt text for each PNG output, in page order: the notebook's title and the section the image is in (from
    markdown cells, and from the Markdown a code cell displays)."""
    title, section, alts = "", "", []
    for cell in nb.cells:
        texts = [cell.source] if cell.cell_type == "markdown" else []
        for o in cell.get("outputs", []) if cell.cell_type == "code" else []:
            texts.append("".join(o.get("data", {}).get("text/markdown", "")))
            if "image/png" in o.get("data", {}):
                title, section = _heads(texts, title, section)
                texts = []
                alts.append(f"{section or title}: figure from {title or 'this notebook'}")
        title, section = _heads(texts, title, section)
    return alts


def _heads(texts: list[str], title: str, section: str) -> tuple[str, str]:
    heads = [h for t in texts for h in re.findall(r"^#{1,3}\s+(.+)$", t, flags=re.M)]
    return (title or heads[0], heads[-1]) if heads else (title, section)


def to_html(ipynb_path: str | Path, lead_md: str | None = None, show_code: bool = False,
            out: str | Path | None = None, verdict: str | None = None) -> Path:
    """Render a notebook to ``<same name>.html`` beside it (or ``out``), atomically: one self-contained page,
    images embedded, nothing loaded from a network. ``lead_md`` (Markdown, e.g. the record's report.md: verdict
    and results table) goes first; the notebook's code is hidden unless ``show_code``. ``verdict``: the page
    belongs to a record whose verdict.json says so; its head carries the mark greta verify reads
    (greta.reports.verdict_marks)."""
    import nbformat
    from nbconvert import HTMLExporter
    from nbconvert.filters import markdown2html

    ipynb_path = Path(ipynb_path)
    nb = nbformat.read(str(ipynb_path), as_version=4)
    exporter = HTMLExporter(template_name="basic")
    exporter.exclude_input = not show_code
    exporter.exclude_input_prompt = exporter.exclude_output_prompt = True
    exporter.log.setLevel(logging.ERROR)  # its missing-alt warning: the alt text is set below
    body, _resources = exporter.from_notebook_node(nb)
    for alt in _image_alts(nb):
        body = body.replace(f'alt="{_DEFAULT_ALT}"', f'alt="{html.escape(alt, quote=True)}"', 1)
    lead = f'<section class="greta-lead">{markdown2html(lead_md)}</section>\n' if lead_md else ""
    body, lead = verdict_badges(body), verdict_badges(lead)
    title = html.escape(ipynb_path.stem)
    page = (f'{page_head(verdict)}<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>'
            f"<style>{_CSS}</style></head>\n<body>\n{lead}{body}\n</body></html>\n")
    out = Path(out) if out is not None else ipynb_path.with_suffix(".html")
    atomic_write_text(out, page)
    return out

