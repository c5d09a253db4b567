"""Start-up time and per-point overhead of the two sweep executors (greta sweep --gpus N / --executor ray) on
the CPU sweep, on this machine:

    python bench/bench_sweep_executors.py [--points ctx=[128,256]] [--out outputs/bench-executors]

start-up   local: nothing (processes start per point); ray: ray.init of a local cluster, until it runs a task
overhead   per point: (the sweep's 'ran' log line - its 'started' line) - (the record's own finished_utc -
           started_utc), i.e. launching the point's process and bringing its result back, not the probe itself;
           on Ray a point is logged 'started' when submitted, so a point queued behind the 2 slots counts its wait
Both sweeps run the same points, 2 at a time (--gpus 2; a 2-CPU Ray cluster), one after the other.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

from greta.sweeps.sweep import run_sweep

MATRIX = Path(__file__).resolve().parent.parent / "params" / "cpu_sweep.yaml"


def overheads(sweep_dir: Path) -> list[float]:
    """Seconds per point spent outside the probe (module docstring)."""
    log = [json.loads(x) for x in (sweep_dir / "sweep_log.jsonl").read_text().splitlines()]
    start = {e["point"]: datetime.fromisoformat(e["t_utc"]) for e in log if e["action"] == "started"}
    out = []
    for e in (e for e in log if e["action"] == "ran"):
        meta = json.loads((sweep_dir / "points" / e["point"] / "metadata.json").read_text())
        probe = datetime.fromisoformat(meta["finished_utc"]) - datetime.fromisoformat(meta["started_utc"])
        out.append(((datetime.fromisoformat(e["t_utc"]) - start[e["point"]]) - probe).total_seconds())
    return out


def ray_startup() -> float:
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.get(ray.remote(lambda: 0).remote())
    return time.perf_counter() - t0


def one(name: str, overrides: dict, out_root: Path, **how) -> dict:
    t0 = time.perf_counter()
    d = run_sweep(MATRIX, overrides, out_root=out_root / name, progress=False, report=False, **how)
    oh = overheads(d)
    return {"executor": name, "wall_s": time.perf_counter() - t0, "points": len(oh),
            "overhead_median_s": statistics.median(oh), "overhead_s": sorted(oh)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="sweeps go here (default: a temporary folder)")
    args = ap.parse_args()
    out_root = Path(args.out or tempfile.mkdtemp(prefix="bench-executors-"))
    overrides = {"ctx": [128, 256], "threads": 1}
    rows = [one("local", overrides, out_root, gpus=2) | {"startup_s": 0.0}]
    startup = ray_startup()  # the Ray executor then joins this cluster, as the tests' fixture does
    rows.append(one("ray", overrides, out_root, executor="ray") | {"startup_s": startup})
    for r in rows:
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}))


if __name__ == "__main__":
    main()
