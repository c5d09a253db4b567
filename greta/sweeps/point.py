"""One point of a parallel sweep, in a process of its own (greta.sweeps.parallel starts it):

    python -m greta.sweeps.point <sweep dir> <point name>

The point's params are rebuilt from the sweep's config.json (the declared matrix a resume is held to) and
preflighted here, on the GPUs CUDA_VISIBLE_DEVICES leaves this process; the record goes to
<sweep dir>/points/<point name>. Exit codes: 0 a record was written (whatever its verdict), 130 interrupted
(an INTERRUPTED record), 2 bad input, 3 the record could not be written, 1 anything else; the last line on
stderr says why.
"""
from __future__ import annotations

import sys
from pathlib import Path

from greta.sweeps.parallel import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_RECORD
from greta.terminal import brief, shown


def main(argv: list[str]) -> int:
    from greta.probe.preflight import preflight
    from greta.probe.runner import ProbeInterrupted, run_probe
    from greta.record.params import ParamError
    from greta.record.store import RecordError
    from greta.sweeps.sweep import SweepError, matrix_from_config, read_config

    if len(argv) != 2:
        print("usage: python -m greta.sweeps.point <sweep dir> <point name>", file=sys.stderr)
        return EXIT_BAD_INPUT
    sweep_dir, name = Path(argv[0]), argv[1]
    try:
        params = matrix_from_config(read_config(sweep_dir)).params.get(name)
        if params is None:
            raise SweepError(f"{sweep_dir} declares no point {name!r}")
        run_probe(preflight(params), run_dir=sweep_dir / "points" / name, progress=False)
    except (ParamError, SweepError) as e:
        print(shown(f"greta: error: {e}"), file=sys.stderr)
        return EXIT_BAD_INPUT
    except RecordError as e:
        print(shown(f"greta: error: {e}"), file=sys.stderr)
        return EXIT_RECORD
    except ProbeInterrupted as e:
        print(shown(f"greta: INTERRUPTED by {e.how}; record: {e.run_dir}"), file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the sweep logs this line as the point's error
        import traceback

        traceback.print_exc()
        print(shown(brief(f"{type(e).__name__}: {e}")), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
