"""Time and memory of one full PAG training step: pagctl vs the official formulation vs vanilla.

A step is what the training loop does per batch: forward, the K input gradients with
``create_graph=True``, ``CE + λ·pag_loss``, one backward, one SGD step (momentum 0.9, weight
decay 1e-4, as the official configs). Models are in train mode (BatchNorm batch statistics).

- ``vanilla``: CE only (one forward, one backward).
- ``pagctl``: `pagctl.gradients.logits_and_input_gradients` (one forward serves both terms).
- ``official``: the official code's step without augmentation: a CE forward on the batch,
  then a second forward on the batch repeated K times (`official_input_gradients`).

Every (architecture, formulation) runs in a fresh subprocess, so that allocator caches and
peak counters of one formulation never leak into another. Memory is the step's peak:

- CUDA: ``torch.cuda.max_memory_allocated()`` minus the memory allocated before the first
  step (tensors only, allocator caching excluded);
- CPU: the process's peak resident set size (``getrusage`` max RSS) minus its RSS just before
  the first step. This counts everything the process touched (tensors, allocator slack,
  oneDNN workspaces, the optimiser state created by the first step), so it is an upper bound
  on tensor memory, measured the same way for every formulation.

Inputs are random pixels, random labels and random target gradients: the cost of a step
does not depend on their values. Run from the repository root, e.g.::

    python benchmarks/bench_pag_step.py --quick
    python benchmarks/bench_pag_step.py --device cuda --repeats 20
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

ARCHS = {"small_cnn": "pagctl_small_cnn", "resnet18": "pagctl_cifar_resnet18"}
FORMULATIONS = ("pagctl", "official", "vanilla")
VARIANTS = ("pagctl-amp", "pagctl-cl", "pagctl-amp-cl")
"""pagctl's step with bfloat16 autocast through the double backward (``amp``, as
``train.amp``), the channels_last memory format (``cl``, as ``train.channels_last``), or
both; ``--variants`` adds them."""
LAMBDA = 15.0  # the official ResNet-18 pag_coeff 1.5, as a pagctl weight (λ = 10·c)


def _current_rss_bytes() -> int | None:
    """Resident set size now (Linux), or None where /proc is unavailable."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS: bytes


def _build_model(arch: str, num_classes: int) -> Any:
    import timm

    try:
        import pagctl.models  # noqa: F401  (registers the pagctl_* names in timm)
    except ImportError as exc:
        raise SystemExit(f"cannot import pagctl.models ({exc}); install pagctl first "
                         "(pip install -e .)") from exc
    name = ARCHS[arch]
    if not timm.is_model(name):
        raise SystemExit(f"timm has no model '{name}': pagctl.models must register it")
    return timm.create_model(name, num_classes=num_classes, in_chans=3)


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    """Run one (architecture, formulation) and return its timings and peak memory."""
    import torch
    import torch.nn.functional as F

    from pagctl.gradients import logits_and_input_gradients, official_input_gradients
    from pagctl.losses import pag_loss, sample_target_classes

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = _build_model(args.arch, args.num_classes).to(device).train()
    amp = args.formulation in ("pagctl-amp", "pagctl-amp-cl")
    channels_last = args.formulation.endswith("-cl")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    b, k, c = args.batch_size, args.k, args.num_classes
    x = torch.rand(b, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, c, (b,), generator=gen).to(device)
    targets = torch.randn(b, k, 3, 32, 32, generator=gen).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if args.formulation == "vanilla":
            loss = F.cross_entropy(model(x), y)
        else:
            classes = sample_target_classes(y, c, k, gen)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                if args.formulation == "official":
                    logits = model(x)
                    grads = official_input_gradients(model, x, classes, create_graph=True)
                else:
                    logits, grads = logits_and_input_gradients(
                        model, x, classes, create_graph=True, method=args.method
                    )
                loss = F.cross_entropy(logits.float(), y) + LAMBDA * pag_loss(
                    grads.float(), targets)
        torch.autograd.backward(loss)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _current_rss_bytes() or _peak_rss_bytes()
    times, cpu_times = [], []
    for i in range(args.warmup + args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
        memory_kind = "cuda max_memory_allocated"
    else:
        peak = _peak_rss_bytes() - base
        memory_kind = "peak RSS increase"
    return {
        "arch": args.arch,
        "formulation": args.formulation,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "times_ms": [round(t * 1000, 1) for t in times],
        "median_ms": statistics.median(times) * 1000,
        "median_cpu_ms": statistics.median(cpu_times) * 1000,
        "peak_bytes": peak,
        "memory": memory_kind,
    }


def _run_one(args: argparse.Namespace, arch: str, formulation: str) -> dict[str, Any]:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--worker", "--arch", arch,
        "--formulation", formulation, "--device", args.device, "--repeats", str(args.repeats),
        "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--k", str(args.k),
        "--num-classes", str(args.num_classes), "--method", args.method,
        "--threads", str(args.threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{arch}/{formulation} failed (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _ratio(row: dict[str, Any], ref: dict[str, Any] | None, key: str, digits: int) -> str:
    """``row[key] / ref[key]`` formatted, or "-" without a positive reference."""
    if ref is None or ref[key] <= 0:
        return "-"
    return f"{row[key] / ref[key]:.{digits}f}"


def _table(rows: list[dict[str, Any]]) -> str:
    """Wall time, its ratios, CPU time (CPU device only) and peak memory, one row each."""
    on_cpu = rows[0]["device"] == "cpu"
    header = f"{'arch':<10} {'formulation':<11} {'wall ms':>8} {'×official':>9} {'×vanilla':>8}"
    if on_cpu:
        header += f" {'cpu ms':>8} {'×official':>9}"
    header += f" {'peak MiB':>8} {'×official':>9} {'×pagctl':>8}"
    lines = [header]
    by_key = {(r["arch"], r["formulation"]): r for r in rows}
    for r in rows:
        off = by_key.get((r["arch"], "official"))
        van = by_key.get((r["arch"], "vanilla"))
        line = (f"{r['arch']:<10} {r['formulation']:<11} {r['median_ms']:>8.0f} "
                f"{_ratio(r, off, 'median_ms', 2):>9} {_ratio(r, van, 'median_ms', 1):>8}")
        if on_cpu:
            line += (f" {r['median_cpu_ms']:>8.0f} "
                     f"{_ratio(r, off, 'median_cpu_ms', 2):>9}")
        line += (f" {r['peak_bytes'] / 2**20:>8.0f} "
                 f"{_ratio(r, off, 'peak_bytes', 2):>9} "
                 f"{_ratio(r, by_key.get((r['arch'], 'pagctl')), 'median_ms', 2):>8}")
        lines.append(line)
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--archs", default=None,
                        help=f"comma-separated subset of {', '.join(ARCHS)} (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="1 timed step after 1 warm-up, small_cnn only unless --archs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--k", type=int, default=10, help="target classes per image")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--method", default="loop", choices=("loop", "batched", "repeat"),
                        help="pagctl's input-gradient method")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", action="store_true", help="print JSON rows, not a table")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--arch", help=argparse.SUPPRESS)
    parser.add_argument("--variants", action="store_true",
                        help="also pagctl's step with bf16 autocast, channels_last, and both "
                        f"({', '.join(VARIANTS)})")
    parser.add_argument("--formulation", choices=FORMULATIONS + VARIANTS,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 1, 1
    if args.archs is None:
        args.archs = "small_cnn" if args.quick else ",".join(ARCHS)
    unknown = [a for a in args.archs.split(",") if a not in ARCHS]
    if unknown:
        parser.error(f"unknown --archs {unknown}; choose from {', '.join(ARCHS)}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    rows = []
    for arch in args.archs.split(","):
        for formulation in FORMULATIONS + (VARIANTS if args.variants else ()):
            print(f"running {arch}/{formulation} ...", file=sys.stderr, flush=True)
            rows.append(_run_one(args, arch, formulation))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    first = rows[0]
    print(f"device {first['device']}, {first['threads']} thread(s), B={args.batch_size}, "
          f"K={args.k}, 32×32×3, {args.num_classes} classes, method={args.method}, "
          f"median of {args.repeats} after {args.warmup} warm-up; memory = {first['memory']}")
    if first["device"] == "cpu":
        print("cpu ms = process CPU time summed over threads: less sensitive than wall time to "
              "other processes on a shared machine")
    print(_table(rows))


if __name__ == "__main__":
    main()
