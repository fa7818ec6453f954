"""What ``torch.compile`` gives pagctl's steps: a plain cross-entropy step, the PAG step,
whose input gradients are differentiated again (double backward), and a 10-step PGD attack
(`pagctl.attacks.pgd.pgd`, eval mode: a forward and an input gradient per step), eager
against the compiled model, in one process.

    python benchmarks/bench_compile.py --threads 1
    python benchmarks/bench_compile.py --device cuda --arch resnet18
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="small_cnn", choices=("small_cnn", "resnet18"))
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: default)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import timm
    import torch
    import torch.nn.functional as F

    import pagctl.models  # noqa: F401  (registers the architectures)
    from pagctl.gradients import logits_and_input_gradients
    from pagctl.losses import pag_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    name = {"small_cnn": "pagctl_small_cnn", "resnet18": "pagctl_cifar_resnet18"}[args.arch]
    model = timm.create_model(name, num_classes=10, in_chans=3).to(dev).train()
    x, y = torch.rand(64, 3, 32, 32, device=dev), torch.randint(0, 10, (64,), device=dev)
    targets = torch.randn(64, 10, 3, 32, 32, device=dev)
    classes = torch.arange(10, device=dev).repeat(64, 1)

    def plain(net: Any) -> None:
        F.cross_entropy(net(x), y).backward()

    def pag(net: Any) -> None:
        logits, grads = logits_and_input_gradients(net, x, classes, create_graph=True)
        (F.cross_entropy(logits, y) + pag_loss(grads, targets)).backward()

    def timed(step: Callable[[Any], None], net: Any) -> tuple[float, float]:
        """(seconds of the first call, median ms of the next ones)."""
        start = time.perf_counter()
        step(net)
        first = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(net)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return first, sorted(times)[len(times) // 2] * 1000

    from pagctl.attacks.pgd import pgd

    adversarial: dict[str, Any] = {}

    def attack(net: Any) -> None:
        model.eval()
        adversarial[id(net)] = pgd(
            net, x, y, norm="linf", eps=8 / 255, steps=10, step_size=2 / 255,
            random_start=True, restarts=1, generator=torch.Generator().manual_seed(0))
        model.train()

    compiled = torch.compile(model)
    print(f"{args.arch} on {dev}, B = 64, K = 10, 32×32×3, median of {args.repeats}")
    for label, step in (("cross-entropy step", plain), ("PAG step", pag),
                        ("PGD, 10 steps", attack)):
        _, eager_ms = timed(step, model)
        try:
            first, compiled_ms = timed(step, compiled)
        except Exception as exc:  # noqa: BLE001 - report what torch.compile refuses
            print(f"{label:<19} eager {eager_ms:8.1f} ms   compiled: fails "
                  f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
            continue
        print(f"{label:<19} eager {eager_ms:8.1f} ms   compiled {compiled_ms:8.1f} ms "
              f"({compiled_ms / eager_ms:.2f}×, first call {first:.0f} s)")
    if len(adversarial) == 2:
        eager_adv, compiled_adv = adversarial[id(model)], adversarial[id(compiled)]
        with torch.no_grad():
            model.eval()
            same = (model(eager_adv).argmax(1) == model(compiled_adv).argmax(1)).float().mean()
        print(f"PGD eager vs compiled: largest pixel difference "
              f"{float((eager_adv - compiled_adv).abs().max()):.2e}, same prediction on "
              f"{float(same):.1%} of the points")


if __name__ == "__main__":
    main()
