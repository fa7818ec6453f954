"""Cost of one adversarial-training step, with and without the PAG term, against a plain step.

Runs the real training loop (`pagctl.train.train`) for one epoch of each built-in digits
recipe below, with the per-epoch monitor reduced to clean accuracy, and reads the epoch
record's cost accounting (`pagctl.train.StepCost`): seconds per step split into the inner
attack, the PAG term and the rest, and forward/backward passes per image. Ratios are to the
plain (``digits-vanilla``) step of the same invocation; compare ratios, not absolute times,
on a shared machine.

    python benchmarks/bench_at_step.py                # all recipes, 1 epoch each
    python benchmarks/bench_at_step.py --epochs 2 --threads 1 --json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

RECIPES = ("digits-vanilla", "digits-pag-nn", "digits-fast-at", "digits-pgd-at",
           "digits-pgd-at-pag-nn", "digits-trades", "digits-trades-pag-nn", "digits-mart")


def measure(name: str, epochs: int, out: Path) -> dict[str, float]:
    from pagctl.checkpoint import read_metrics
    from pagctl.data import load_data
    from pagctl.spec import load_spec
    from pagctl.train import PHASES, train

    spec = load_spec(name, [f"train.epochs={epochs}", "eval.attack=null",
                            "eval.align_source=null", "eval.limit=10", f"out_dir={out / name}"])
    train(spec, device="cpu", progress=False)
    records = [r for r in read_metrics(out / name) if r["kind"] == "train_epoch"]
    steps = len(load_data(spec.data).train) // spec.data.batch_size * epochs  # type: ignore[arg-type]
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
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes.split(","):
            rows[name] = measure(name, args.epochs, Path(tmp))
    base = rows.get("digits-vanilla", next(iter(rows.values())))["total_ms"]
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
