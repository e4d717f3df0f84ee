"""Encoder benchmark: every named foundation encoder built offline (random weights, no download),
its parameters counted and one tile run at its input size on CPU, one model at a time.

    .venv/bin/python benchmarks/encoders.py [--only uni --only virchow2]

The same measurement as `histoflow encoders --build`; prints the table (measured vs published)
and writes benchmarks/results/encoders.json with the seconds each took. The three ~1.1 B-parameter
models need about 5 GB of memory each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "encoders.json"


def main(argv: list[str] | None = None) -> int:
    from histoflow.encoders import encoder_row, encoder_rows, spec_for

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", help="only this model (repeatable)")
    args = parser.parse_args(argv)

    def progress(row: dict) -> None:
        published = encoder_row(spec_for(row["name"]))
        print(f"{row['name']:<14} dim {row['dim']:>5} (published {published['dim']:>5})  "
              f"params {row['params_m']!s:>7} M (published {published['params_m'] or '-'!s:>6})  "
              f"{row.get('seconds', '-')} s  {row['checked']}", flush=True)

    rows = encoder_rows(build=True, only=args.only, progress=progress)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                               "rows": rows}, indent=1))
    os.replace(tmp, RESULTS)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
