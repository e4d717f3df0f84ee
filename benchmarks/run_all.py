"""Run every benchmark in benchmarks/ (each ``*.py`` but this one) and print their reports.

    .venv/bin/python benchmarks/run_all.py [name ...]     (`make bench` runs them all)

Each benchmark runs in its own process (so one's memory or imports never colour another's
figures), prints its own table and writes benchmarks/results/<name>.json. Exit status is non-zero
when any benchmark fails; the others still run.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def benchmarks(names: list[str] | None = None) -> list[Path]:
    found = sorted(p for p in HERE.glob("*.py") if p.name != Path(__file__).name and not p.name.startswith("_"))
    if names:
        wanted = {n.removesuffix(".py") for n in names}
        missing = wanted - {p.stem for p in found}
        if missing:
            raise SystemExit(f"no benchmark named {', '.join(sorted(missing))} in {HERE} "
                             f"(have: {', '.join(p.stem for p in found)})")
        found = [p for p in found if p.stem in wanted]
    return found


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    failed = []
    for path in benchmarks(argv):
        print(f"\n=== {path.stem} ===", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(path)], cwd=HERE.parent)
        print(f"=== {path.stem}: {'ok' if proc.returncode == 0 else f'FAILED ({proc.returncode})'} "
              f"in {time.perf_counter() - start:.1f} s ===", flush=True)
        if proc.returncode != 0:
            failed.append(path.stem)
    if failed:
        print(f"\nfailed benchmarks: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
