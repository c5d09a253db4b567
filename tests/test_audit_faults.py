"""A notebook kernel that dies mid-probe still leaves a complete FAIL_CRASH record."""
import json

import nbformat

from greta import notebooks

CPU_PARAMS = notebooks.REPO_ROOT / "params" / "cpu_default.yaml"


def test_kernel_death_leaves_a_fail_crash_record(tmp_path, monkeypatch):
    def dead_kernel(src, out, parameters, timeout_s=None):
        nbformat.write(nbformat.read(src, as_version=4), out)  # papermill keeps the partial notebook
        return RuntimeError("DeadKernelError: Kernel died")

    monkeypatch.setattr(notebooks, "execute_notebook", dead_kernel)
    run_dir = notebooks.run_audit(CPU_PARAMS, {"ctx": 256}, out_root=tmp_path)
    verdict = json.loads((run_dir / "verdict.json").read_text())
    assert verdict["verdict"] == "FAIL_CRASH" and "Kernel died" in verdict["reason"]
    assert "FAIL_CRASH" in (run_dir / "report.md").read_text()
    assert (run_dir / "run_b3_77.ipynb").is_file() and (run_dir / "run_b3_77.html").is_file()
