"""Training throughput with 1 and with N processes under torchrun (data-parallel training).

Each configuration is a real ``torchrun --standalone --nproc-per-node P -m pagctl train``
of the same spec with the same global batch (the per-epoch monitor turned off); the
throughput is the training images of the last epoch over its ``train_seconds`` (the slowest
rank's, from metrics.jsonl), so start-up, data loading and the first epoch's warm-up are
not counted. Every process gets ``--threads`` CPU threads (torchrun's OMP_NUM_THREADS).

CPU (the default: digits-pag-nn, gloo)::

    python benchmarks/bench_data_parallel.py --procs 1,2
    python benchmarks/bench_data_parallel.py --procs 1,2 --set train.sync_batchnorm=false

GPU (NCCL, one GPU per process; the paper's CIFAR-10 recipe needs its data)::

    python benchmarks/bench_data_parallel.py --device cuda --procs 1,2,4 \\
        --spec cifar10-rn18-pag-nn --data-dir ~/data --epochs 2 --set train.amp=true
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _run(args: argparse.Namespace, procs: int, out: Path) -> dict[str, Any]:
    """One launch; its last epoch's record and throughput."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    env["OMP_NUM_THREADS"] = str(args.threads)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(procs), "-m", "pagctl", "train", args.spec, "--device", args.device, "-q",
           "--out", str(out), "--set", f"train.epochs={args.epochs}",
           "--set", "eval.attack=null", "--set", "eval.align_source=null",
           "--format", "json"]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    for item in args.set:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{procs} process(es): exit {proc.returncode}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r.get("kind") == "train_epoch"][-1]
    spec = json.loads((out / "spec.json").read_text())
    n_train = _training_images(proc.stderr)
    batch = spec["data"]["batch_size"]
    seen = (n_train // batch) * batch if spec["train"]["drop_last"] else n_train
    return {"procs": procs, "train_seconds": last["train_seconds"],
            "images_per_second": seen / last["train_seconds"], "images": seen,
            "loss": last["loss"]}


def _training_images(log: str) -> int:
    """The training set's size, from the run's first log line ('NAME: N training images')."""
    for line in log.splitlines():
        if " training images, " in line:
            return int(line.split(": ", 1)[1].split(" training images")[0])
    raise SystemExit("the run's log names no training set size")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default="digits-pag-nn")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per process)")
    parser.add_argument("--procs", default="1,2", help="process counts, comma-separated")
    parser.add_argument("--epochs", type=int, default=2, help="the last one is timed")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--set", action="append", default=[], help="a spec override")
    parser.add_argument("--json", action="store_true", help="print JSON rows")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for procs in (int(p) for p in args.procs.split(",")):
            rows.append(_run(args, procs, Path(tmp) / f"p{procs}"))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    base = rows[0]["images_per_second"]
    print(f"{args.spec} on {args.device}, {args.threads} thread(s) per process, "
          f"{rows[0]['images']} images per epoch, last of {args.epochs} epochs timed")
    print(f"{'processes':>9} {'epoch s':>8} {'images/s':>9} {'speed-up':>8} {'loss':>8}")
    for r in rows:
        print(f"{r['procs']:>9} {r['train_seconds']:>8.2f} {r['images_per_second']:>9.0f} "
              f"{r['images_per_second'] / base:>8.2f} {r['loss']:>8.4f}")


if __name__ == "__main__":
    main()
