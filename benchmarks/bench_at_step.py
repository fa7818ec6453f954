"""Cost of one adversarial-training step, with and without the PAG term, against a plain step.

Runs the real training loop (`pagctl.train.train`) for one epoch of each built-in digits
recipe below, with the per-epoch monitor reduced to clean accuracy, and reads the epoch
record's cost accounting (`pagctl.train.StepCost`): seconds per step split into the inner
attack, the PAG term and the rest, and forward/backward passes per image. Ratios are to the
first recipe's step (``digits-vanilla``: the plain step) of the same invocation; compare
ratios, not absolute times, on a shared machine. With more than one epoch the first is left
out (warm-up: cuDNN's algorithm search, the allocator, the data workers' start).

    python benchmarks/bench_at_step.py                # all recipes, 1 epoch each
    python benchmarks/bench_at_step.py --epochs 2 --threads 1 --json
    python benchmarks/bench_at_step.py --device cuda --epochs 2 --data-dir DIR \
        --recipes cifar10-rn18-vanilla,cifar10-rn18-pgd-at,cifar10-rn18-trades
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

RECIPES = ("digits-vanilla", "digits-pag-nn", "digits-fast-at", "digits-pgd-at",
           "digits-pgd-at-pag-nn", "digits-trades", "digits-trades-pag-nn", "digits-mart")


def measure(name: str, epochs: int, out: Path, device: str,
            extra: list[str]) -> dict[str, float]:
    from pagctl.checkpoint import read_metrics
    from pagctl.data import load_data, split_validation
    from pagctl.records import TrainEpochRecord
    from pagctl.spec import load_spec
    from pagctl.train import PHASES, train

    spec = load_spec(name, [f"train.epochs={epochs}", "eval.attack=null",
                            "eval.align_source=null", "eval.limit=10", f"out_dir={out / name}",
                                *extra])
    train(spec, device=device, progress=False)
    records = [r.to_json() for r in read_metrics(out / name).of(TrainEpochRecord)]
    if len(records) > 1:
        records = records[1:]
    bundle = load_data(spec.data)
    if spec.data.validation_size:
        bundle = split_validation(bundle, spec.data.validation_size, spec.data.split_seed)
    steps = len(bundle.train) // spec.data.batch_size * len(records)  # type: ignore[arg-type]
    row = {f"{p}_ms": 1000 * sum(r[f"{p}_seconds"] for r in records) / steps for p in PHASES}
    row["total_ms"] = sum(row[f"{p}_ms"] for p in PHASES)
    passes = records[-1]["passes_per_image"]
    row["forward"] = sum(passes[p]["forward"] for p in PHASES)
    row["backward"] = sum(passes[p]["backward"] for p in PHASES)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    parser.add_argument("--data-dir", help="data.root for recipes whose data is not embedded")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a spec override applied to every recipe (repeatable)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes.split(","):
            extra = list(args.set) + ([f"data.root={args.data_dir}"] if args.data_dir else [])
            rows[name] = measure(name, args.epochs, Path(tmp), args.device, extra)
    base = next(iter(rows.values()))["total_ms"]
    for row in rows.values():
        row["x_plain"] = row["total_ms"] / base
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| recipe | ms/step | × plain | attack ms | PAG ms | rest ms | fwd/img | bwd/img |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['total_ms']:.1f} | {r['x_plain']:.2f} | {r['attack_ms']:.1f} | "
              f"{r['pag_ms']:.1f} | {r['step_ms']:.1f} | "
              f"{r['forward']:g} | {r['backward']:g} |")


if __name__ == "__main__":
    main()
