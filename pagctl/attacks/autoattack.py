"""AutoAttack (Croce & Hein, ICML 2020): a fixed ensemble of complementary attacks, each run
on the points the previous ones left robust, so a point counts as robust only if it
survives all of them (the per-point worst case).

Versions, as the reference defines them:

- ``standard``: APGD-CE (1 run) → APGD-T (9 target classes) → FAB-T (9 target classes) →
  Square (5,000 queries), 100 iterations for the gradient attacks. In L1 the APGD stages
  change as the reference's L1 AutoAttack (Croce & Hein, 2021) does: APGD-CE makes 5 runs
  and APGD-T targets the 5 highest non-true classes, both on the 3ε → 2ε → ε schedule
  (``large_eps``);
- ``plus``: APGD-CE and APGD-DLR (5 restarts each) → FAB (5 restarts) → Square →
  APGD-T → FAB-T;
- ``rand``: APGD-CE and APGD-DLR with Expectation over Transformation (20 forwards per
  gradient), for models whose forward pass is random;
- ``custom``: the stages named in ``attacks_to_run``, in that order (the reference's
  ``version='custom'``). AutoAttack's own stages (``apgd_ce``, ``apgd_t``, ``fab_t``,
  ``square``, ``apgd_dlr``, ``fab``) have the settings the reference's custom version
  gives them, which are those of ``plus`` in every norm (APGD-CE 5 restarts, not the 1
  of ``standard``; no L1 large-ε schedule); any other registered attack runs with its defaults
  and the ensemble's ``eps``, ``norm`` and ``seed``. The reference's hyphenated names
  (``apgd-ce``) are accepted.

``pagctl attack`` runs the stages itself (so it can report what each one broke, what it
cost, and resume between them); calling the plugin directly runs them in turn as well.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, model_validator
from torch import Tensor, nn

from pagctl.attacks.apgd import APGDCE, APGDDLR, APGDT
from pagctl.attacks.base import AttackBase
from pagctl.attacks.fab import FAB, FABT
from pagctl.attacks.square import Square
from pagctl.attacks.steps import AnyNorm, AnyNormParam, runs_together_field
from pagctl.protocols import BuildContext, Epsilon, PluginParams

Version = Literal["standard", "plus", "rand", "custom"]

_MIN_CLASSES = {"standard": 4, "plus": 4, "rand": 3, "custom": 0}


def _stage_names(value: Any) -> Any:
    """``attacks_to_run`` as typed: a list, or one comma-separated string (``--param
    attacks_to_run=apgd-ce,square``); names lower-cased, the reference's hyphens read as
    underscores."""
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return tuple(v.strip().lower().replace("-", "_") if isinstance(v, str) else v
                     for v in value)
    return value


StageNames = Annotated[tuple[str, ...], BeforeValidator(_stage_names)]


Plan = list[tuple[str, type[Any], dict[str, Any]]]


def _plan(version: Version, norm: AnyNorm, steps: int, queries: int) -> Plan:
    """(stage name, plugin class, params) for each stage of ``version`` in ``norm``, in
    order."""
    targeted = {"steps": steps, "restarts": 1, "n_target_classes": 9}
    square = {"queries": queries, "p_init": 0.8, "restarts": 1, "rescale_schedule": False}
    if version == "standard" and norm == "l1":
        return [("apgd_ce", APGDCE, {"steps": steps, "restarts": 5, "large_eps": True}),
                ("apgd_t", APGDT, {**targeted, "n_target_classes": 5, "large_eps": True}),
                ("fab_t", FABT, targeted),
                ("square", Square, square)]
    if version == "standard":
        return [("apgd_ce", APGDCE, {"steps": steps, "restarts": 1}),
                ("apgd_t", APGDT, targeted),
                ("fab_t", FABT, targeted),
                ("square", Square, square)]
    if version == "plus":
        return [("apgd_ce", APGDCE, {"steps": steps, "restarts": 5}),
                ("apgd_dlr", APGDDLR, {"steps": steps, "restarts": 5}),
                ("fab", FAB, {"steps": steps, "restarts": 5}),
                ("square", Square, square),
                ("apgd_t", APGDT, targeted),
                ("fab_t", FABT, targeted)]
    return [("apgd_ce", APGDCE, {"steps": steps, "restarts": 1, "eot_iter": 20}),
            ("apgd_dlr", APGDDLR, {"steps": steps, "restarts": 1, "eot_iter": 20})]


def _custom_plan(names: tuple[str, ...], norm: AnyNorm, steps: int, queries: int) -> Plan:
    """The stages of ``version=custom``: AutoAttack's own with the settings the reference's
    custom version gives them (its constructor's: APGD-CE and APGD-DLR 5 restarts, APGD-T
    and FAB-T 1 restart and 9 target classes, FAB 5 restarts, Square 5,000 queries, no
    large-ε schedule in L1 — the settings of ``plus``), any other registered attack with
    its defaults. ValueError naming ``attacks_to_run`` for a name nobody registered."""
    from pagctl import registry

    own = {name: (cls, extra) for name, cls, extra in _plan("plus", norm, steps, queries)}
    plan: Plan = []
    for name in names:
        if name in own:
            plan.append((name, *own[name]))
            continue
        if name == "autoattack" or name not in registry.attacks.names():
            known = sorted(set(own) | set(registry.attacks.names()) - {"autoattack"})
            raise ValueError(f"attacks_to_run: no attack named '{name}'; choose from "
                             f"{', '.join(known)}")
        plan.append((name, registry.attacks.get(name), {}))
    return plan


@lru_cache(maxsize=64)
def _stage_params(params: Any, num_classes: int) -> tuple[tuple[str, Any, BaseModel], ...]:
    """(name, plugin class, validated Params) of every stage: validated once per evaluation,
    however many batches build the ensemble (``params`` is frozen, hence a cache key)."""
    from pagctl.protocols import declared_budget

    stages = []
    plan = _custom_plan(params.attacks_to_run, params.norm, params.steps,
                        params.square_queries) if params.version == "custom" else \
        _plan(params.version, params.norm, params.steps, params.square_queries)
    own = {cls for cls in (APGDCE, APGDDLR, APGDT, FAB, FABT, Square)}
    for name, cls, extra in plan:
        fields = cls.Params.model_fields
        common = {key: value for key, value in
                  (("eps", params.eps), ("norm", params.norm), ("seed", params.seed))
                  if key in fields}
        if cls not in own:
            try:
                stage_params = cls.Params.model_validate(common)
            except ValueError as exc:
                raise ValueError(f"attacks_to_run: stage '{name}' refuses the ensemble's "
                                 f"settings: {exc}") from None
            norm = declared_budget(cls, stage_params)[0]
            if norm != params.norm:
                raise ValueError(f"attacks_to_run: stage '{name}' attacks in {norm}, not "
                                 f"in the ensemble's {params.norm}; drop it or change norm")
            stages.append((name, cls, stage_params))
            continue
        if "n_target_classes" in extra:
            extra = {**extra,
                     "n_target_classes": min(extra["n_target_classes"], num_classes - 1)}
        if cls is not Square:
            extra = {**extra, "runs_together": params.runs_together}
        stages.append((name, cls, cls.Params.model_validate({**common, **extra})))
    return tuple(stages)


class AutoAttack(AttackBase):
    """AutoAttack: APGD-CE, APGD-T, FAB-T and Square in turn, per-point worst case, in
    L∞, L2 or L1."""

    class Params(PluginParams):
        eps: Epsilon = Field(
            default=8 / 255, ge=0, allow_inf_nan=False,
            description="radius in [0, 1] pixel space, in the chosen norm (number or fraction "
            "string such as \"8/255\")",
        )
        norm: AnyNormParam = Field(
            default="linf", description="'linf', 'l2' or 'l1' (any case)",
        )
        version: Version = Field(
            default="standard", description="'standard' (deterministic models), 'plus' "
            "(more restarts and attacks), 'rand' (randomised models: EoT over 20 forwards) "
            "or 'custom' (the stages of attacks_to_run)",
        )
        attacks_to_run: StageNames = Field(
            default=(), description="version=custom: the stages in order, e.g. "
            "apgd_ce,apgd_t or [apgd-ce, square]; AutoAttack's own (apgd_ce, apgd_t, fab_t, "
            "square, apgd_dlr, fab) with the reference's settings, or any registered attack "
            "with its defaults",
        )
        seed: int | None = Field(
            default=None, description="seed of every stage's randomness; null = the run's seed",
        )
        steps: int = Field(
            default=100, ge=1, description="iterations of the gradient attacks (the reference "
            "uses 100; fewer gives a weaker, non-standard evaluation)",
        )
        runs_together: int | None = runs_together_field(
            "target classes and restarts of the APGD and FAB stages")
        square_queries: int = Field(
            default=5000, ge=1, description="queries of the Square stage (the reference uses "
            "5,000; fewer gives a weaker, non-standard evaluation)",
        )

        @model_validator(mode="after")
        def _custom_names_stages(self) -> AutoAttack.Params:
            if self.version == "custom" and not self.attacks_to_run:
                raise ValueError("attacks_to_run: version=custom runs the stages listed "
                                 "here; give them, e.g. attacks_to_run=apgd_ce,apgd_t")
            if self.version != "custom" and self.attacks_to_run:
                raise ValueError(f"attacks_to_run: chooses the stages of version=custom, "
                                 f"not of '{self.version}'; add version=custom or drop it")
            if len(set(self.attacks_to_run)) != len(self.attacks_to_run):
                raise ValueError("attacks_to_run: a stage is listed twice; list each once")
            return self

    params: Params

    def __init__(self, params: Params, ctx: BuildContext) -> None:
        need = _MIN_CLASSES[params.version]
        if ctx.num_classes < need:
            raise ValueError(
                f"version {params.version!r} needs at least {need} classes (its DLR losses "
                f"compare the top logits), the data has {ctx.num_classes}; attack with "
                "apgd_ce instead"
            )
        super().__init__(params, ctx)
        self._stages: list[tuple[str, Any]] = [
            (name, cls(stage_params, ctx))
            for name, cls, stage_params in _stage_params(params, ctx.num_classes)]

    def stages(self) -> list[tuple[str, Any]]:
        """The attacks in the order they run: ``[(name, attack), ...]``."""
        return list(self._stages)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Shape: (N, C, H, W) in [0, 1], (N,) -> (N, C, H, W) adversarial inputs: for each
        point, the first stage's adversarial example that fools the model, else the last
        stage's output."""
        import torch

        with torch.no_grad():
            robust = model(x).argmax(dim=1) == y
        out = x.clone()
        for _, attack in self._stages:
            active = robust.nonzero().squeeze(1)
            if active.numel() == 0:
                break
            adv = attack(model, x[active], y[active])
            with torch.no_grad():
                fooled = model(adv).argmax(dim=1) != y[active]
            out[active] = adv
            robust[active[fooled]] = False
        return out
