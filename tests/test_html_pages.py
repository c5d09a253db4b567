"""The one HTML exporter (greta.reports.notebooks.to_html) that audit, sweep and oracle pages go through:
verdict first, code hidden unless asked for, nothing loaded from a network, small apart from its images,
images with alt text; and every page kind renders in headless Chromium where /usr/bin/chromium exists."""
from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest

from greta.reports.notebooks import to_html

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"


def png_bytes() -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 2))
    fig.add_subplot().plot([0, 1, 2], [1, 0, 1])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def executed_notebook(path: Path) -> Path:
    """A small executed notebook: a title, a code cell printing to stderr, a section with a figure."""
    nb = nbformat.v4.new_notebook()
    code = nbformat.v4.new_code_cell("import secret_marker_module\nprint('hello')", execution_count=1)
    code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hello\n")]
    fig = nbformat.v4.new_code_cell("show_the_plot()", execution_count=2)
    fig.outputs = [nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(png_bytes()).decode(),
                                                                "text/plain": "<Figure>"})]
    nb.cells = [nbformat.v4.new_markdown_cell("# The run"), code, nbformat.v4.new_markdown_cell("## Memory"), fig]
    nbformat.write(nb, path)
    return path


def without_images(page: str) -> int:
    return len(page) - sum(len(m) for m in re.findall(r"data:image/png;base64,[A-Za-z0-9+/=]+", page))


def test_page_puts_the_lead_first_hides_code_and_loads_nothing(tmp_path):
    page = to_html(executed_notebook(tmp_path / "run.ipynb"), lead_md="# B3.77 — PASS_EQUIV\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    text = page.read_text()
    assert page == tmp_path / "run.html"
    assert text.index("PASS_EQUIV") < text.index("hello"), "the lead is not first"
    assert "<table" in text[:text.index("hello")]
    assert "secret_marker_module" not in text, "code is shown by default"
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), "the page loads something from a network"
    assert "<script" not in text
    assert without_images(text) <= 150_000
    alts = re.findall(r'<img[^>]*alt="([^"]+)"', text)
    assert alts == ["Memory: figure from The run"]


def test_show_code_shows_the_code(tmp_path):
    text = to_html(executed_notebook(tmp_path / "run.ipynb"), show_code=True).read_text()
    assert "secret_marker_module" in text


def test_negative_control_a_lab_template_page_fails_the_checks(tmp_path):
    """nbconvert's default page carries the CDN scripts and a large stylesheet: the checks above would see it."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_filename(str(executed_notebook(tmp_path / "run.ipynb")))
    assert re.search(r"""(src|href)=["']?(https?:)?//""", body) or without_images(body) > 150_000


def committed(name: str) -> Path:
    hits = sorted(ROOT.glob(f"outputs/*/*/*/{name}"))
    if not hits:
        pytest.skip(f"no committed {name}")
    return hits[-1]


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not installed (CI has none)")
@pytest.mark.parametrize("kind", ["run_b3_77.ipynb", "vram_plot.ipynb", "equivalence_analysis.ipynb",
                                  "sweep_report.ipynb", "synthetic"])
def test_every_page_kind_renders_in_headless_chromium(tmp_path, kind):
    if kind == "synthetic":
        src = executed_notebook(tmp_path / "page.ipynb")
    else:
        src = tmp_path / kind
        shutil.copy(committed(kind), src)
    page = to_html(src, lead_md="# verdict line")
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,900",
                    f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True, timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
