"""Command line: `python -m greta <command> ...` (probe, audit, verify, analyze, reproduce, sweep, legacy, oracle)

  probe  run the probe and write its record (JSON, CSV, report.md)
  audit  run the probe kind's run notebook (notebooks/run_b3_77.ipynb, batch_probe.ipynb) with papermill into
         a fresh record directory: the probe, its analysis notebooks, and an HTML rendering of each
  verify check a record: manifest hashes, params, phases, artifacts, VRAM floor, verdict vs metrics (a sweep
         directory: each point, the log, the aggregate)
  analyze recompute a record's metrics and verdict from its logits (OK, INCOMPLETE, MISSING_LOGITS,
         SPAN_MISMATCH, with reasons)
  reproduce re-run a sealed record here from its params.json and compare the bits (its logits file, else its
         fingerprints): REPRODUCED, DIFFERS (where) or NOT_COMPARABLE (what differs in the environment); writes
         a sealed reproduction record linking both. Exit 0 REPRODUCED, 1 otherwise (or a record that does not verify)
  sweep  run every point of a matrix file (lists for ctx, kv_aligned, seed, dtype) as its own record, then
         the aggregate report (sweep_report.html) and sweep_verdict.json; --resume DIR skips complete points;
         --gpus N runs N points at a time, each on its own group of tp GPUs.
         Exit 0 on PASS_GUARDRAIL, 1 on FAIL_GUARDRAIL / INCOMPLETE, 2 on bad input
  legacy print the results table of the original engine's traces (runs/kv_aligned_<K>/seed_<S>/... or
         runs/kv_<K>/seed_<S>/ctx_<N>/...), re-analyzed with Greta's metrics and verdicts
  oracle compare Greta's logits (prefill and decode paths) with transformers' model of the family
         (LlamaForCausalLM, Qwen2ForCausalLM) on a checkpoint directory (needs transformers: pip install
         greta[test]); exit 1 outside tolerance. On a .gguf file or a real model (--model smollm2): tokens,
         logits over a text and a greedy continuation

Exit codes: 0 pass (PASS_EQUIV, EXPECTED_DRIFT, a peer engine's ENGINE_DRIFT; verify: the record verifies), 1 any
other verdict (verify: the reasons it does not), 2 bad input or an unwritable output folder, 130 interrupted (record written).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from greta.probe.preflight import preflight  # pure until called: torch is imported by the checks themselves
from greta.terminal import echo, shown

# probe/audit without -f: the README's first command, and the batch probe's CPU file with --batch N
DEFAULT_PARAMS = "params/cpu_default.yaml"
DEFAULT_BATCH_PARAMS = "params/cpu_batch.yaml"


class _UsageError(Exception):
    pass


def _fail(msg) -> int:
    """One `greta: error:` line on stderr; the exit code of bad input."""
    print(shown(f"greta: error: {msg}"), file=sys.stderr)
    return 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one `greta: error:` line and exit code 2, like a bad param."""

    def error(self, message):
        raise _UsageError(f"{message} (see {self.prog} --help)")


def _gguf_oracle_cmd(args) -> int:
    """The oracle on a GGUF file (checks.oracle_gguf): fp32 on the CPU, printed (no record yet)."""
    from greta.checks.oracle import OracleMissing
    from greta.checks.oracle_gguf import compare_gguf, format_result, verdict

    if args.out_root or args.dtype != "float32" or args.device != "cpu" or args.backend != "torch":
        return _fail("the oracle on a GGUF file runs in float32 on the CPU with the torch backend and prints its "
                     "result: drop -o, --dtype, --device and --backend")
    try:
        res = compare_gguf(args.model, steps=args.steps, kv_aligned=args.kv_aligned, control=args.control,
                           quiet=args.quiet)
    except (OracleMissing, ValueError, FileNotFoundError) as e:
        return _fail(e)
    print(shown(format_result(res), lines=True))
    return 0 if verdict(res) == "PASS_ORACLE" else 1


def _oracle_cmd(args) -> int:
    import shutil
    import tempfile

    from greta.engine.config import PRESETS
    from greta.checks.oracle import OracleMissing, compare, format_result, preset_checkpoint, write_record
    from greta.record.store import RecordError, preflight

    from greta.engine.real_models import REAL_MODELS

    if args.model in REAL_MODELS or args.model.endswith(".gguf"):
        return _gguf_oracle_cmd(args)
    model, made, tmp = args.model, None, None
    try:
        if args.out_root:
            _check_out_root(args.out_root)
            preflight(args.out_root, None)  # writable, with room for a record without logits (an oracle is under 1 MB)
        if args.model in PRESETS:
            model = args.checkpoint_dir or tempfile.mkdtemp(prefix=f"greta-{args.model}-")
            tmp = None if args.checkpoint_dir else model
            made = preset_checkpoint(args.model, model, args.seed, args.dtype, args.device, args.quiet)
        res = compare(model, ctx=args.ctx, dtype=args.dtype, device=args.device, seed=args.seed,
                      steps=min(args.steps, args.ctx - 1), kv_aligned=args.kv_aligned, chunk=args.chunk,
                      kv_block=args.kv_block, backend=args.backend, positions=args.positions,
                      control=args.control, quiet=args.quiet)
    except (OracleMissing, ValueError, FileNotFoundError, RecordError) as e:
        return _fail(e)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if made:
        res["model"] = args.model
    print(shown(format_result(res), lines=True))
    if args.out_root:
        d = write_record(res, args.out_root, {k: v for k, v in vars(args).items() if k != "cmd"}, made)
        print(shown(f"record: {d}"))
    return 0 if res["ok"] and not res.get("control", {}).get("ok") else 1


def _add_run_cmds(sub):
    for name in ("probe", "audit"):
        sp = sub.add_parser(name)
        sp.add_argument("-f", "--file", default=None,
                        help=f"params YAML (default: {DEFAULT_PARAMS}, with --batch {DEFAULT_BATCH_PARAMS})")
        sp.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. -p ctx=32768 -p timeouts.decode=60 (repeatable)")
        sp.add_argument("-o", "--out-root", default=None,
                        help="records go under this folder (default: the checkout's outputs/)")
        sp.add_argument("--quiet", action="store_true", help="no progress on the terminal")
        sp.add_argument("--batch", type=int, default=None, metavar="N",
                        help=f"the batch probe with N requests: the same as -p probe=batch -p batch=N "
                             f"(on {DEFAULT_BATCH_PARAMS} unless -f says otherwise)")
        if name == "audit":
            sp.add_argument("--show-code", action="store_true", help="the HTML pages show the notebooks' code")


def _add_check_cmds(sub):
    vp = sub.add_parser("verify")
    vp.add_argument("run_dir", nargs="+", help="record directories, or sweep directories (each point, the log, "
                    "the aggregate)")
    vp.add_argument("--allow-missing-logits", action="store_true",
                    help="accept an absent logits.npz (records committed to git leave it out)")
    rp = sub.add_parser("reproduce")
    rp.add_argument("run_dir", help="a sealed record directory (or a sweep directory: each point)")
    rp.add_argument("-o", "--out-root", default=None,
                    help="the re-run and the reproduction record go under this folder (default: the checkout's outputs/)")
    rp.add_argument("--quiet", action="store_true", help="no progress on the terminal")
    anp = sub.add_parser("analyze")
    anp.add_argument("run_dir", help="a record directory")
    anp.add_argument("--json", action="store_true", help="print the whole result as JSON")
    swp = sub.add_parser("sweep")
    swp.add_argument("-f", "--file", default=None, help="matrix YAML, e.g. params/b3_76.yaml (optional with --resume)")
    swp.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                     help="override a base param or an axis, e.g. -p gen=64 -p ctx=[4096,8192] (repeatable)")
    swp.add_argument("-o", "--out-root", default="outputs", help="sweeps go under this folder (default: %(default)s)")
    swp.add_argument("--resume", metavar="SWEEP_DIR", default=None, help="resume this sweep: complete points are skipped")
    swp.add_argument("--quiet", action="store_true", help="no progress bars")
    swp.add_argument("--gpus", type=int, default=None, metavar="N",
                     help="run points concurrently, each in its own process on its own group of tp of N GPUs "
                          "(slots with device=cpu); default: one after another")
    swp.add_argument("--executor", choices=("local", "ray"), default="local",
                     help="local: this machine's processes (--gpus N); ray: each point a Ray task on a Ray cluster "
                          "(pip install 'greta[ray]'; docs/SWEEPS.md)")
    swp.add_argument("--address", default=None, metavar="HOST:PORT",
                     help="with --executor ray: the running cluster to join (e.g. 10.0.0.1:6379, or auto); "
                          "default: start a local one")
    lgp = sub.add_parser("legacy")
    lgp.add_argument("runs_dir", help="the original engine's runs/ folder")
    lgp.add_argument("--json", action="store_true", help="print the rows as JSON")


def _add_oracle_cmd(sub):
    op = sub.add_parser("oracle")
    op.add_argument("--model", required=True, help="an HF checkpoint directory (config.json + safetensors), a "
                    "preset (llama3-8b, ...): transformers first saves a random checkpoint of that shape, or a .gguf "
                    "file or real model (smollm2): both read the file, text prompts")
    op.add_argument("--ctx", type=int, default=128, help="prompt length (default: %(default)s)")
    op.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    op.add_argument("--device", default="cpu")
    op.add_argument("--backend", choices=("torch", "triton"), default="torch", help="Greta's backend (default: %(default)s)")
    op.add_argument("--kv-aligned", type=int, choices=(0, 1), default=1)
    op.add_argument("--chunk", type=int, default=64, help="Greta's prefill chunk (default: %(default)s)")
    op.add_argument("--kv-block", type=int, default=64, help="Greta's KV block (default: %(default)s)")
    op.add_argument("--steps", type=int, default=8, help="decode steps compared (default: %(default)s)")
    op.add_argument("--positions", type=int, default=None,
                    help="compare the prefill path at this many positions spread over the prompt (default: all)")
    op.add_argument("--seed", type=int, default=0, help="prompt seed, and the random checkpoint's (default: %(default)s)")
    op.add_argument("--control", action="store_true", help="also run the wrong-RoPE negative control (must fail)")
    op.add_argument("-o", "--out-root", default=None, help="write a sealed record under this folder (oracle.json, oracle.png, report.md)")
    op.add_argument("--checkpoint-dir", default=None, help="where a preset's random checkpoint is saved (default: a temp dir, removed after)")
    op.add_argument("--quiet", action="store_true", help="no progress lines")


def _parser() -> _Parser:
    ap = _Parser(prog="greta", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_run_cmds(sub)
    _add_check_cmds(sub)
    _add_oracle_cmd(sub)
    return ap


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
    except _UsageError as e:
        return _fail(e)
    commands = {"sweep": _sweep_cmd, "legacy": _legacy_cmd, "oracle": _oracle_cmd, "analyze": _analyze_cmd,
                "verify": _verify_cmd, "probe": _run_cmd, "audit": _run_cmd, "reproduce": _reproduce_cmd}
    return commands[args.cmd](args)


def _legacy_cmd(args) -> int:
    from greta.checks.legacy import main as legacy_main

    return legacy_main(args.runs_dir, as_json=args.json)


def _analyze_cmd(args) -> int:
    import json

    from greta.checks.analyze import analyze_run

    rep = analyze_run(args.run_dir)
    if args.json:
        print(shown(json.dumps(rep, indent=2, default=str), lines=True))
    else:
        print(shown(f"{rep['status']}: {args.run_dir} (verdict {rep.get('verdict')})"))
        for r in rep["reasons"]:
            print(shown(f"  - {r}"))
    return 0 if rep["status"] == "OK" else 1


def _verify_cmd(args) -> int:
    from greta.checks.verify import verify
    from greta.sweeps.verify import is_sweep_dir, verify_sweep

    bad = 0
    for d in args.run_dir:
        check = verify_sweep if is_sweep_dir(d) else verify
        reasons = check(d, allow_missing_large=args.allow_missing_logits)
        print(shown(f"{'OK' if not reasons else 'FAIL'} {d}"))
        for r in reasons:
            print(shown(f"  - {r}"))
        bad += bool(reasons)
    return 1 if bad else 0


def _reproduce_cmd(args) -> int:
    """reproduce: the verdict and the reproduction record on stdout; exit 0 REPRODUCED, 1 DIFFERS or
    NOT_COMPARABLE or an original that does not verify (as verify's FAIL), 2 bad input, 130 interrupted."""
    from greta.checks.reproduce import OriginalRefused, ReproduceError
    from greta.probe.runner import ProbeInterrupted
    from greta.record.store import RecordError
    from greta.sweeps.layout import SweepError
    from greta.sweeps.reproduce import reproduce_path

    def say(line):
        if not args.quiet:
            print(shown(f"reproduce: {line}"), file=sys.stderr)

    try:
        rdir, body = reproduce_path(args.run_dir, out_root=args.out_root, progress=not args.quiet, say=say)
    except (ReproduceError, RecordError, SweepError) as e:
        return _fail(e)
    except OriginalRefused as e:
        print(shown(f"greta: refused: {e}"), file=sys.stderr)
        return 1
    except ProbeInterrupted as e:
        print(shown(f"greta: INTERRUPTED by {e.how}; re-run record: {e.run_dir}"), file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # outside a re-run (checking, comparing, writing): no reproduction record is left
        print("greta: INTERRUPTED by SIGINT (Ctrl-C) before the reproduction record was sealed; none was written",
              file=sys.stderr)
        return 130
    print(shown(f"{body['verdict']}: {body['reason']}"))
    print(shown(f"record: {rdir}"))
    return 0 if body["verdict"] == "REPRODUCED" else 1


def _check_out_root(out_root, error=ValueError) -> None:
    """-o must not lie inside an existing record (records are never nested): one line naming both."""
    from greta.record.rundir import enclosing_record, nested_message, resolve_out_root

    try:
        outer = enclosing_record(resolve_out_root(out_root))
    except (OSError, ValueError):  # a name too long, a NUL: the folder checks say so
        return
    if outer is not None:
        raise error(nested_message(out_root, outer))


def _run_params(args):
    """The validated params of a probe/audit command line (ParamError on bad input)."""
    from greta.record.params import ParamError, load_params, parse_overrides

    if args.out_root is not None:
        try:
            out = Path(args.out_root)
            bad_out = not args.out_root or "\0" in args.out_root or (out.exists() and not out.is_dir())
        except OSError:  # e.g. a name too long for the filesystem
            bad_out = True
        if bad_out:
            raise ParamError(f"-o {echo(args.out_root)} is not a folder; records go under a folder, e.g. -o outputs")
        _check_out_root(args.out_root, ParamError)
    overrides = parse_overrides(args.param)
    if args.batch is not None:
        overrides = {"probe": "batch", "batch": args.batch, **overrides}
    return preflight(load_params(params_file(args), overrides))


def params_file(args) -> str:
    """-f, else the CPU default of the probe asked for: the batch one with --batch, B3.77's otherwise."""
    if args.file is not None:
        return args.file
    return DEFAULT_BATCH_PARAMS if args.batch is not None else DEFAULT_PARAMS


def _run_cmd(args) -> int:
    """probe / audit: the verdict and the record directory on stdout; exit 0 pass, 1 other, 130 interrupted."""
    import json

    from greta.probe.kinds import kind_of
    from greta.probe.runner import ProbeInterrupted
    from greta.record.params import ParamError
    from greta.record.store import RecordError

    try:
        params = _run_params(args)
    except ParamError as e:
        return _fail(e)
    try:
        if args.cmd == "probe":
            from greta.record.store import new_probe_dir
            from greta.probe.runner import run_probe

            run_dir = run_probe(params, run_dir=new_probe_dir(args.out_root, params),
                                progress=not args.quiet)
        else:
            from greta.audit import run_audit

            run_dir = run_audit(params, out_root=args.out_root, progress=not args.quiet, show_code=args.show_code)
    except RecordError as e:
        return _fail(e)
    except ProbeInterrupted as e:
        print(shown(f"greta: INTERRUPTED by {e.how}; record: {e.run_dir}"), file=sys.stderr)
        return 130
    from greta.audit import closing_lines

    verdict = json.loads((Path(run_dir) / "verdict.json").read_text())
    print(shown("\n".join(closing_lines(run_dir)), lines=True))
    return kind_of(params).exit_code(verdict["verdict"])


def _sweep_cmd(args) -> int:
    import json

    from greta.record.params import ParamError, parse_overrides
    from greta.probe.runner import ProbeInterrupted
    from greta.record.store import RecordError
    from greta.sweeps.sweep import VERDICT, SweepError, run_sweep

    if not args.file and not args.resume:
        return _fail("sweep needs -f <matrix.yaml> (e.g. params/b3_76.yaml) or --resume <sweep dir>")
    try:
        if not args.resume:
            _check_out_root(args.out_root, ParamError)
        sweep_dir = run_sweep(args.file, parse_overrides(args.param), out_root=args.out_root, sweep_dir=args.resume,
                              progress=not args.quiet, gpus=args.gpus,
                              executor=args.executor, address=args.address)
    except (ParamError, SweepError, RecordError) as e:
        return _fail(e)
    except ProbeInterrupted as e:
        print(shown(f"greta: sweep INTERRUPTED by {e.how} in {e.run_dir}; resume with --resume "
                    f"{Path(e.run_dir).parent.parent}"), file=sys.stderr)
        return 130
    v = json.loads((Path(sweep_dir) / VERDICT).read_text())
    print(shown(f"{v['verdict']}: " + " | ".join(v["reasons"])))
    print(shown(f"sweep: {sweep_dir}"))
    if v.get("report_html"):
        print(shown(f"report: {Path(sweep_dir) / v['report_html']}"))
    return 0 if v["verdict"] == "PASS_GUARDRAIL" else 1


if __name__ == "__main__":
    sys.exit(main())
