"""The notebooks in a real Jupyter server (what JupyterLab talks to): a server process on a free port of
127.0.0.1, a kernel that the server starts (REST), every notebook's cells executed through it (websocket), in
order, with their default parameters (the run and sweep notebooks get a small size and a temporary out_root);
no cell may end in an error. Skipped where jupyter_server is not installed (pip install -e '.[lab]';
.ci/run installs it)."""
from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import nbformat
import pytest

pytest.importorskip("jupyter_server")
tornado_ws = pytest.importorskip("tornado.websocket")

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`jupyter server` as its own process, with a token; stopped (and its kernels with it) on exit."""

    def __init__(self, root: Path):
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", "--no-browser", f"--ServerApp.port={self.port}",
             "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={root}",
             "--ServerApp.port_retries=0", "--allow-root"],  # CI containers run as root
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.api("GET", "/api/status")
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("the Jupyter server did not come up in 60 s")
                time.sleep(0.3)

    def api(self, method: str, path: str, body: dict | None = None):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read()
        return json.loads(text) if text else None

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


async def run_cells(server: Server, kernel_id: str, sources: list[str], timeout_s: float) -> list[list[dict]]:
    """Execute each source on the kernel over its websocket; the iopub outputs of each."""
    url = f"ws://127.0.0.1:{server.port}/api/kernels/{kernel_id}/channels?token={server.token}"
    ws = await tornado_ws.websocket_connect(url)
    session, results = uuid.uuid4().hex, []
    try:
        for code in sources:
            msg_id = uuid.uuid4().hex
            await ws.write_message(json.dumps({
                "header": {"msg_id": msg_id, "username": "test", "session": session, "msg_type": "execute_request",
                           "version": "5.3"},
                "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
                "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                            "allow_stdin": False, "stop_on_error": True}}))
            outputs, idle, replied = [], False, False
            deadline = time.monotonic() + timeout_s
            while not (idle and replied):
                left = deadline - time.monotonic()
                assert left > 0, f"cell did not finish in {timeout_s} s:\n{code[:200]}"
                raw = await ws.read_message()
                assert raw is not None, "the kernel's websocket closed"
                msg = json.loads(raw)
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind = msg["header"]["msg_type"]
                if kind == "status" and msg["content"]["execution_state"] == "idle":
                    idle = True
                elif kind == "execute_reply":
                    replied = True
                elif kind in ("stream", "display_data", "execute_result", "error"):
                    outputs.append({"type": kind, **msg["content"]})
            results.append(outputs)
    finally:
        ws.close()
    return results


SMALL = 'ctx = 256\ngen = 8\nspan = 4\nprefill_chunk = 64\nkv_block = 128\nout_root = r"{out}"\n'
NOTEBOOKS = {  # name -> the cell injected after the parameters cell (as papermill would), or None
    "run_b3_77.ipynb": SMALL,
    "batch_probe.ipynb": SMALL + 'batch_gen = "8,2,8,5"\n',  # cpu_batch.yaml's 4 requests, within gen 8
    "vram_plot.ipynb": None,
    "equivalence_analysis.ipynb": None,
    "sweep.ipynb": 'out_root = r"{out}"\n',
    "sweep_report.ipynb": None,
}


def sources(name: str, out: Path) -> list[str]:
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    cells = []
    for c in nb.cells:
        if c.cell_type != "code":
            continue
        cells.append(c.source)
        if "parameters" in c.metadata.get("tags", []) and NOTEBOOKS[name]:
            cells.append(NOTEBOOKS[name].format(out=out))
    return cells


def _snapshot(folder: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_every_notebook_runs_in_a_real_jupyter_server(tmp_path):
    import asyncio

    committed = _snapshot(ROOT / "outputs")  # the notebooks' defaults open the newest committed records
    server = Server(ROOT)
    try:
        assert server.api("GET", "/api/kernelspecs")["kernelspecs"], "the server lists no kernel"
        for name in NOTEBOOKS:
            kernel = server.api("POST", "/api/kernels", {"name": "python3"})
            try:
                outs = asyncio.run(run_cells(server, kernel["id"], sources(name, tmp_path / "records"), 300))
            finally:
                server.api("DELETE", f"/api/kernels/{kernel['id']}")
            errors = [f"{o['ename']}: {o['evalue']}" for cell in outs for o in cell if o["type"] == "error"]
            assert errors == [], f"{name}: {errors}"
            shown = json.dumps(outs)
            assert "image/png" in shown or name == "sweep.ipynb", f"{name}: no figure shown"
        assert list((tmp_path / "records").glob("*/b3_77/*/manifest.json")), "the run notebook sealed no record"
        assert list((tmp_path / "records").glob("*/batch/*/manifest.json")), "the batch notebook sealed no record"
        assert server.api("GET", "/api/kernels") == [], "kernels left running"
        assert _snapshot(ROOT / "outputs") == committed, "viewing a record changed files under outputs/"
    finally:
        server.stop()
    assert server.proc.poll() is not None
