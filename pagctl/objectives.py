"""Adversarial training's inner attack: the registered attack that makes ``x_adv`` for a
training objective (``train.objective``, ``train.inner_attack``), run the way the objective's
reference runs it and checked the way ``pagctl attack`` checks an attack.

The objectives' losses are `pagctl.losses.objective_loss`; the step that combines them with
the PAG term is `pagctl.train`. Here:

- **Which attack.** Any registered attack (``pgd_linf``, ``pgd_l2``, ``fgsm``, a plugin),
  named in the spec with its Params, validated when the run is set up. It must declare a
  budget (``eps``): adversarial training against an unbounded attack is not defined.
- **Which mode.** BatchNorm statistics while the attack runs follow ``train.attack_mode``;
  ``auto`` is each objective's reference: train mode for ``pgd_at`` (Madry et al.'s and
  Rice et al.'s code attack the model in train mode) and ``fast_at`` (Wong et al.), eval mode
  for ``trades`` (yaodongyu/TRADES) and ``mart`` (YisenWang/MART). In train mode the attack's
  forward passes update the running statistics, as in those references.
- **Which randomness.** The attack is built afresh for every step with the seed
  `step_seed` (run seed, epoch, step), so a resumed run draws the same random starts as an
  uninterrupted one, and the same batch and seed give the same ``x_adv`` as
  ``pagctl attack`` with that ``--seed`` (the parity test). An explicit ``seed`` in the
  attack's params overrides it (then every step reuses that seed). When data-parallel
  training or gradient accumulation cuts the batch into slices, each slice has its own seed
  (`step_seed`'s ``part``), so the random starts depend on how the batch is cut.
- **Which checks.** Every output is checked like the engine checks it
  (`pagctl.protocols`): the inputs untouched, a finite tensor of the inputs' shape in
  [0, 1], within the declared budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pagctl.errors import SpecError

if TYPE_CHECKING:
    import torch
    from pydantic import BaseModel
    from torch import Tensor, nn

    from pagctl.data import DataBundle
    from pagctl.spec import TrainSpec

__all__ = ["REFERENCE_MODE", "InnerAttack", "step_seed"]

REFERENCE_MODE: dict[str, Literal["train", "eval"]] = {
    "pgd_at": "train", "fast_at": "train", "trades": "eval", "mart": "eval"}
"""The BatchNorm mode each objective's reference code attacks in (``attack_mode: auto``)."""

WHERE = "train.inner_attack"


def step_seed(seed: int, epoch: int, step: int, part: int = 0) -> int:
    """The inner attack's seed for 0-based ``epoch`` and ``step`` of a run seeded ``seed``;
    ``part``: which slice of the step's batch (`pagctl.distributed.replicas`; 0 for a whole
    batch, whose seed is the step's)."""
    base = ((seed * 1_000_003 + epoch) * 1_000_033 + step) % (2**63)
    return base if part == 0 else (base * 1_000_037 + part) % (2**63)


@dataclass
class InnerAttack:
    """The validated inner attack of a run: call it on a batch to get ``x_adv``."""

    name: str
    params: BaseModel
    norm: str
    eps: float
    mode: Literal["train", "eval"]
    bundle: DataBundle
    device: torch.device
    cache_dir: Path | None

    @classmethod
    def build(cls, t: TrainSpec, bundle: DataBundle, device: torch.device,
              cache_dir: Path | None = None) -> InnerAttack | None:
        """The inner attack ``t`` names (None for objective ``ce``), built once to check it:
        a registered name, valid params, a declared budget. Raises SpecError naming
        ``train.inner_attack`` otherwise."""
        from pagctl import registry
        from pagctl.build import build_context
        from pagctl.protocols import NORMS, declared_budget

        if t.objective == "ce" or t.inner_attack is None:
            return None
        ref = t.inner_attack
        params = registry.attacks.validate_params(ref.name, ref.params, WHERE)
        ctx = build_context(bundle, device, t.seed, cache_dir)
        attack = registry.attacks.instantiate(ref.name, params, ctx, WHERE)
        norm, eps = declared_budget(attack, params)
        if eps is None or norm is None:
            raise SpecError(f"{WHERE}: '{ref.name}' declares no budget (eps and norm); "
                            "adversarial training needs a bounded attack, e.g. pgd_linf, "
                            "pgd_l2 or fgsm")
        if norm not in NORMS:
            raise SpecError(f"{WHERE}: '{ref.name}' declares a budget in norm {norm!r}, "
                            f"which cannot be checked; use one of {', '.join(NORMS)}")
        if not eps > 0:
            raise SpecError(f"{WHERE}: '{ref.name}' has eps {eps}; adversarial training "
                            "needs eps > 0 (use objective 'ce' for none)")
        mode = REFERENCE_MODE[t.objective] if t.attack_mode == "auto" else t.attack_mode
        from pagctl.robustness.budget import check_budget

        check_budget(f"{WHERE}.params.eps", norm, eps, bundle.input_shape)
        return cls(ref.name, params, norm, eps, mode, bundle, device, cache_dir)

    def __call__(self, net: nn.Module, model: nn.Module, inputs: Tensor, labels: Tensor,
                 seed: int) -> Tensor:
        """``x_adv`` for ``inputs`` against ``net`` (the model, possibly wrapped by the
        step's augmentation), with ``model`` in the attack's BatchNorm mode and put back in
        train mode afterwards. Shape: (N, C, H, W) in [0, 1], (N,) -> (N, C, H, W) detached.
        """
        from pagctl import registry
        from pagctl.build import build_context
        from pagctl.errors import PagctlError
        from pagctl.protocols import check_attack_output, check_inputs_untouched, raised

        who = f"{WHERE} '{self.name}'"
        ctx = build_context(self.bundle, self.device, seed, self.cache_dir)
        attack: Any = registry.attacks.instantiate(self.name, self.params, ctx, WHERE)
        before = inputs.clone()
        model.train(self.mode == "train")
        try:
            x_adv = attack(net, inputs, labels)
        except (PagctlError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise raised(who, exc) from exc
        finally:
            model.train(True)
        check_inputs_untouched(who, [(inputs, before)])
        check_attack_output(who, inputs, x_adv, self.norm, self.eps)
        out: Tensor = x_adv.detach()
        return out
