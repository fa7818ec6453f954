"""``python -m pagctl.toy_experiment``: the toy experiment's command line (``make toy``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pagctl.toy_experiment import (
    DEFAULT_SEEDS,
    DEFAULT_TRAIN_SIZE,
    run_toy_experiment,
    summary_table,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pagctl.toy_experiment",
        description="Train vanilla, PAG (exact score) and PAG (nearest neighbour) on the 2-D "
        "toy, measure their robustness over an L2 epsilon sweep, and write "
        "decision_boundaries.png, robustness.png and results.json.")
    parser.add_argument("--out", type=Path, default=Path("runs/toy"), help="output folder")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu: "
                        "the models are tiny)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per run (default: about 500 steps)")
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)),
                        help="comma-separated seeds (default 0,1,2,3,4)")
    parser.add_argument("--train-size", type=int, default=DEFAULT_TRAIN_SIZE,
                        help=f"training points per run (default {DEFAULT_TRAIN_SIZE})")
    parser.add_argument("--no-attacks", action="store_true",
                        help="only the exact (grid) robustness, no attack suite")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    from pagctl.errors import PagctlError

    try:
        results = run_toy_experiment(args.out, device=args.device, epochs=args.epochs,
                                     progress=not args.quiet, seeds=seeds,
                                     train_size=args.train_size, attacks=not args.no_attacks)
    except PagctlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary_table(results))
    print(f"wrote {args.out}/decision_boundaries.png, robustness.png, results.json "
          f"({results['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
