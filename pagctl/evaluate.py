"""Per-epoch evaluation: clean accuracy, the monitoring attack, and mean alignment."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagctl.build import Setup


def evaluate(s: Setup, epoch: int, align_source: Any) -> dict[str, Any]:
    """Metrics on the first ``eval.limit`` test images after 0-based ``epoch``.

    The monitoring attack and the class sampling of the alignment metric are seeded from the
    run seed and the epoch, never from the training RNG, so evaluating does not change what
    training does next (resume stays bit-for-bit).
    """
    import torch

    from pagctl import registry
    from pagctl.align import mean_alignment
    from pagctl.attack import clean_accuracy, run_attack
    from pagctl.build import build_context

    spec, device = s.spec, s.device
    n_test = len(s.bundle.test)  # type: ignore[arg-type]
    n = min(spec.eval.limit or n_test, n_test)
    indices = torch.arange(n)
    seed = spec.train.seed + 1000 * (epoch + 1)
    batch = spec.data.eval_batch_size
    out: dict[str, Any] = {"n_test": n}
    if spec.eval.attack is not None:
        ref = spec.eval.attack
        params = registry.attacks.validate_params(ref.name, ref.params, "eval.attack")
        attack = registry.attacks.instantiate(
            ref.name, params, build_context(s.bundle, device, seed, None), "eval.attack")
        rep = run_attack(s.model, attack, s.bundle.test, indices, name=ref.name,
                         params=params, batch_size=batch, device=device, seed=seed)
        out.update(clean_accuracy=rep.clean_accuracy, robust_accuracy=rep.robust_accuracy,
                   monitor={"attack": rep.attack, "params": rep.params})
    else:
        out["clean_accuracy"] = clean_accuracy(s.model, s.bundle.test, indices,
                                               batch_size=batch, device=device)
    if align_source is not None:
        out["alignment"] = mean_alignment(
            s.model, s.bundle.test, indices, align_source, num_classes=s.bundle.num_classes,
            classes_per_image=spec.train.classes_per_image, batch_size=batch, device=device,
            seed=seed)
    return out
