"""Command line: `python -m greta probe|audit -f params.yaml -p key=value ...`

  probe  run the probe and write its record (JSON, CSV, report.md)
  audit  run notebooks/run_b3_77.ipynb with papermill into a fresh record directory: the probe, the
         VRAM plot and equivalence notebooks, and an HTML rendering of each
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one `greta: error:` line and exit code 2, like a bad param."""

    def error(self, message):
        raise _UsageError(f"{message} (see {self.prog} --help)")


def main(argv=None) -> int:
    ap = _Parser(prog="greta", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("probe", "audit"):
        sp = sub.add_parser(name)
        sp.add_argument("-f", "--file", default="params/cpu_default.yaml", help="params YAML (default: %(default)s)")
        sp.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. -p ctx=32768 -p timeouts.decode=60 (repeatable)")
        sp.add_argument("-o", "--out-root", default="outputs", help="records go under this folder (default: %(default)s)")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
    from .params import ParamError, load_params, parse_overrides

    try:
        args = ap.parse_args(argv)
        try:
            out = Path(args.out_root)
            bad_out = not args.out_root or "\0" in args.out_root or (out.exists() and not out.is_dir())
        except OSError:  # e.g. a name too long for the filesystem
            bad_out = True
        if bad_out:
            raise ParamError(f"-o {args.out_root!r} is not a folder; records go under a folder, e.g. -o outputs")
        overrides = parse_overrides(args.param)
        params = load_params(args.file, overrides)
    except (_UsageError, ParamError) as e:
        print(f"greta: error: {e}", file=sys.stderr)
        return 2
    if args.cmd == "probe":
        from .probe import run_probe

        run_dir = run_probe(params, out_root=args.out_root, progress=not args.quiet)
    else:
        from .notebooks import run_audit

        run_dir = run_audit(args.file, overrides, out_root=args.out_root)
    import json

    verdict = json.loads((Path(run_dir) / "verdict.json").read_text())
    print(f"{verdict['verdict']}: {verdict['reason']}")
    print(f"record: {run_dir}")
    return 0 if verdict["verdict"] in ("PASS_EQUIV", "EXPECTED_DRIFT") else 1


if __name__ == "__main__":
    sys.exit(main())
