"""``python -m tests.chaos``: one chaos run (see tests/chaos/harness.py); exit 1 when an
invariant broke. The same ``--seed`` replays the same faults."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tests.chaos.harness import FAULTS, Settings, available_faults, run, unavailable_reason


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180.0, help="how long faults are injected")
    parser.add_argument("--seed", type=int, default=1, help="the faults' seed (the same seed replays them)")
    parser.add_argument("--faults", default=",".join(available_faults()),
                        help=f"comma list of the faults to draw from (default: {', '.join(FAULTS)}; "
                             "the blackholes need root and iptables)")
    parser.add_argument("--gap", default="6,14", help="seconds between faults, drawn between these bounds")
    parser.add_argument("--min-faults", type=int, default=0, help="go on past --seconds until this many faults")
    parser.add_argument("--max-stream", type=int, default=8 << 20, help="largest echo stream, bytes")
    parser.add_argument("--no-pgbench", action="store_true", help="no pgbench workload")
    parser.add_argument("--out", type=Path, help="write report.json and faults.jsonl here")
    args = parser.parse_args()
    if why := unavailable_reason():
        print(f"cannot run here: {why}", file=sys.stderr)
        return 2
    faults = tuple(f.strip() for f in args.faults.split(",") if f.strip())
    bad = [f for f in faults if f not in FAULTS]
    if bad:
        parser.error(f"unknown faults {bad}: choose from {', '.join(FAULTS)}")
    low, high = (float(x) for x in args.gap.split(","))
    report = run(Settings(seconds=args.seconds, seed=args.seed, gap=(low, high), min_faults=args.min_faults,
                          faults=faults, max_stream=args.max_stream, pgbench=not args.no_pgbench), args.out)
    print(json.dumps(report, indent=1))
    return 1 if report["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
