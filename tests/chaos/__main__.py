"""``python -m tests.chaos``: one chaos run (see tests/chaos/harness.py); exit 1 when an
invariant broke. The same ``--seed`` replays the same faults."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tests.chaos.harness import FAULTS, Settings, available_faults, run, unavailable_reason
from tests.helpers.release import extract_previous_release


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180.0, help="how long faults are injected")
    parser.add_argument("--seed", type=int, default=1, help="the faults' seed (the same seed replays them)")
    parser.add_argument("--faults", default=",".join(available_faults()),
                        help=f"comma list of the faults to draw from (default: {', '.join(FAULTS)}; "
                             "the blackholes need root and iptables)")
    parser.add_argument("--min-faults", type=int, default=0, help="go on past --seconds until this many faults")
    parser.add_argument("--max-stream", type=int, default=8 << 20, help="largest echo stream, bytes")
    parser.add_argument("--no-pgbench", action="store_true", help="no pgbench workload")
    parser.add_argument("--out", type=Path, help="write report.json and faults.jsonl here")
    parser.add_argument("--rolling-upgrade", action="store_true",
                        help="start on the previous release and upgrade relays, then agents, instead of faults")
    parser.add_argument("--gap", type=float, nargs=2, default=(6.0, 14.0), metavar=("MIN", "MAX"),
                        help="seconds between faults (or upgrade steps), drawn between these bounds")
    args = parser.parse_args()
    if why := unavailable_reason():
        print(f"cannot run here: {why}", file=sys.stderr)
        return 2
    faults = tuple(f.strip() for f in args.faults.split(",") if f.strip())
    bad = [f for f in faults if f not in FAULTS]
    if bad:
        parser.error(f"unknown faults {bad}: choose from {', '.join(FAULTS)}")
    settings = Settings(seconds=args.seconds, seed=args.seed, faults=faults, max_stream=args.max_stream,
                        pgbench=not args.no_pgbench, gap=tuple(args.gap), min_faults=args.min_faults)
    with tempfile.TemporaryDirectory(prefix="chaos-release-") as work:
        if args.rolling_upgrade:
            _, settings.upgrade_from = extract_previous_release(Path(work) / "release")
        report = run(settings, args.out)
    print(json.dumps(report, indent=1, default=str))
    return 1 if report["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
