"""One attack evaluation, as ``pagctl attack`` and `pagctl.api.attack` both run it: pick the
subset, probe the model, run the attack (once or over an ε-sweep) with the engine
(`pagctl.robustness.engine`) and attach the reliability verdict
(`pagctl.robustness.reliability`) to every report.

What is attacked is an `AttackJob` (the attack, its params, the sweep, the probes); how it
is measured is an `pagctl.evaluation.EvaluationRequest` (points, batches, seed, precision,
progress file, shards). A long evaluation can be split into N shards run as independent
jobs (``shard=(i, N)``), each attacking every N-th batch and keeping its progress in a shard
file named by the evaluation's key; ``merge_shards=N`` then combines the N finished shards
into the report of the unsharded run — the same per-point results and counts — and runs the
probes on it (`pagctl.evaluation.sharding`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pagctl.errors import CheckpointError, FieldError

if TYPE_CHECKING:
    from pydantic import BaseModel
    from torch import Tensor, nn

    from pagctl.data import DataBundle
    from pagctl.evaluation.request import EvaluationRequest
    from pagctl.robustness.reliability import Verdict
    from pagctl.robustness.report import AttackReport


@dataclass(frozen=True)
class AttackJob:
    """Which attack an evaluation runs, and what it keeps besides the numbers.

    ``name``: a registered attack; ``params``: its validated Params. ``budgets``: an
    ε-sweep (one report per budget; None: the params' own eps). ``probes``: run the
    gradient-masking probes on the first ``probe_size`` points and attach the verdict.
    ``keep_images``: keep the adversarial versions of the first that many points (not in
    shards); every point's (``report.adversarial``,
    `pagctl.robustness.adversarial.AdversarialExamples`) when it covers the subset.
    ``refuse_implausible``: an ε whose ball holds the whole pixel box
    (`pagctl.robustness.budget`) is a `FieldError` of ``params.eps`` rather than a warning.
    """

    name: str
    params: BaseModel
    budgets: Sequence[Any] | None = None
    probes: bool = True
    probe_size: int = 100
    keep_images: int = 0
    refuse_implausible: bool = False


def _check_budgets(job: AttackJob, budgets: list[Any] | None,
                   input_shape: tuple[int, int, int]) -> None:
    """Each ε the job runs at (its params', or each of its sweep's) checked against the
    pixel box (`pagctl.robustness.budget.check_budget`): warned about, or refused with
    ``job.refuse_implausible``, before anything runs."""
    from pagctl import registry
    from pagctl.protocols import declared_budget
    from pagctl.robustness.budget import check_budget

    attack = registry.attacks.get(job.name)
    for eps in budgets if budgets is not None else [None]:
        params = job.params if eps is None else job.params.model_copy(update={"eps": eps})
        norm, value = declared_budget(attack, params)
        check_budget("params.eps" if eps is None else "eps_sweep", norm, value, input_shape,
                     refuse=job.refuse_implausible, stacklevel=4)


def evaluate_attack(model: nn.Module, bundle: DataBundle, job: AttackJob,
                    request: EvaluationRequest) -> tuple[list[AttackReport], Tensor]:
    """Attack ``bundle.test`` at the points ``request`` asks for with ``job``'s attack
    (once, or at each budget of its sweep) and attach the reliability verdict.

    ``request.shard=(i, N)`` runs shard i of N into ``request.shard_dir`` (resuming it if it
    stopped) and returns its partial reports, without probes' verdict;
    ``request.merge_shards=N`` runs nothing but merges the N shards found there (module
    docstring). Neither keeps images. ``request.precision="bfloat16"`` runs the model's
    forward under bfloat16 autocast (`pagctl.models.LowPrecision`; opt-in, marked in every
    report; its resumable states and shards are another evaluation's than float32's, as
    the precision is part of their key). Returns the reports (one per budget) and the
    attacked indices. Raises a `FieldError` for what `pagctl.evaluation` refuses (limit,
    batch size, seed, indices, budgets, shards, a model whose outputs do not fit the data)
    and when AutoAttack standard/plus meets a randomised model or a shard to merge is
    missing or unfinished.
    """
    import torch

    from pagctl.data import get_batch, labels_of, subset_digest
    from pagctl.evaluation.request import check_outputs, sweep_budgets
    from pagctl.models import LowPrecision
    from pagctl.provenance import model_digest
    from pagctl.robustness.reliability import sweep_check

    request.check(job.probe_size)
    budgets = sweep_budgets(job.params, job.budgets) if job.budgets is not None else None
    _check_budgets(job, budgets, bundle.input_shape)
    indices = request.points(len(bundle.test))  # type: ignore[arg-type]
    check_outputs(model, bundle, request.device)
    measured = model_digest(model)  # the model itself, whatever precision runs it
    if request.precision == "bfloat16":
        model = LowPrecision(model)
    points = subset_digest(bundle.test, indices)
    probe_idx = indices[:job.probe_size]
    px, py = get_batch(bundle.test, probe_idx)
    px, py = px.to(request.device), py.to(request.device)
    verdict = _quick_probes(model, px, py, job, request)
    out: list[AttackReport] = []
    for i, eps in enumerate(budgets if budgets is not None else [None]):
        params = job.params if eps is None else job.params.model_copy(update={"eps": eps})
        state = request.state
        if state is not None and budgets is not None:
            state = state.with_name(f"{state.stem}-eps{i}{state.suffix}")
        budget = _Budget(model, bundle, job, request.part(state=state), params, indices,
                         measured, points)
        report = budget.merged() if request.merge_shards is not None else budget.run()
        if verdict is not None and i == 0:
            _attack_probes(model, px, py, report, len(probe_idx), verdict, request)
        out.append(report)
    if verdict is not None and len(out) > 1:
        sweep_check([float(r.eps or 0.0) for r in out], [r.robust_accuracy for r in out],
                    out[0].n, verdict)
    labels = torch.as_tensor(labels_of(bundle.test)[indices.numpy()])
    for report in out:
        report.indices, report.labels = indices.clone(), labels
        if report.images is not None and len(report.images) == report.n > 0:
            from pagctl.robustness.adversarial import AdversarialExamples

            report.adversarial = AdversarialExamples(report, bundle.test)
        report.precision = request.precision
        report.model_sha256 = measured
        report.subset["data_sha256"] = points
        if verdict is not None:
            report.reliability = verdict.to_record()
    return out, indices


def _quick_probes(model: nn.Module, px: Tensor, py: Tensor, job: AttackJob,
                  request: EvaluationRequest) -> Verdict | None:
    """The probes before the attack (None when off, and for a shard: a part, whose merge
    probes the whole). FieldError when AutoAttack standard/plus meets a randomised model."""
    from pagctl.robustness.reliability import quick_probes

    if not job.probes:
        return None
    verdict, randomised = quick_probes(model, px, py)
    version = getattr(job.params, "version", None)
    if randomised and version in ("standard", "plus"):
        raise FieldError(
            "params.version", f"the model's outputs change between identical forwards "
            f"(spread {verdict.measured['output_spread']:.3g}); AutoAttack '{version}' "
            "assumes a deterministic model; use version=rand")
    return None if request.shard is not None else verdict


def _attack_probes(model: nn.Module, px: Tensor, py: Tensor, report: AttackReport,
                   probed: int, verdict: Verdict, request: EvaluationRequest) -> None:
    """The probes that attack, on the first budget's result (``probed``: the probe points,
    the first of the subset)."""
    from pagctl.robustness.reliability import attack_probes, square_stage_check

    stage_names = [s.name for s in report.stages]
    if report.norm is not None and report.eps is not None and report.eps > 0:
        attack_probes(model, px, py, report.robust_mask[:probed], norm=report.norm,
                      eps=report.eps, seed=request.seed,
                      white_box_only="square" not in stage_names, verdict=verdict,
                      device=request.device)
    square_stage_check(report.stages, report.n, verdict)


@dataclass(frozen=True)
class _Budget:
    """One budget of an evaluation: its attack built per batch, its key computed once, run
    (whole, resumed, one shard) or merged from its shards."""

    model: nn.Module
    bundle: DataBundle
    job: AttackJob
    request: EvaluationRequest
    params: BaseModel
    indices: Tensor
    model_sha256: str
    data_sha256: str

    def build(self, batch: int) -> Any:
        """The attack of batch ``batch``, seeded from the request's seed and ``batch``."""
        import torch

        from pagctl import registry
        from pagctl.build import build_context

        ctx = build_context(self.bundle, torch.device(self.request.device),
                            self.request.seed * 1_000_003 + batch, None)
        return registry.attacks.instantiate(self.job.name, self.params, ctx, "params")

    def key(self) -> dict[str, Any]:
        from pagctl.protocols import attack_stages
        from pagctl.robustness.engine import attack_key

        return attack_key(self.model, self.bundle.test, self.indices, name=self.job.name,
                          params=self.params,
                          stages=[s for s, _ in attack_stages(self.build(0), self.job.name)],
                          request=self.request, model_sha256=self.model_sha256,
                          data_sha256=self.data_sha256)

    def run(self) -> AttackReport:
        """The whole evaluation at this budget, or one shard of it (resuming its file)."""
        from pagctl.evaluation.sharding import progress_file
        from pagctl.robustness.engine import PerBatch, run_attack

        key = self.key()
        path = progress_file(self.request, self.job.name, key)
        sharded = self.request.shard is not None
        return run_attack(self.model, PerBatch(self.build), self.bundle.test, self.indices,
                          name=self.job.name, params=self.params,
                          request=self.request.part(state=path),
                          keep_images=0 if sharded else self.job.keep_images, key=key)

    def merged(self) -> AttackReport:
        """The report of the whole evaluation from its finished shard files. Each file is
        checked as it loads (`AttackState.load`: its payload digest and invariants); the
        clean bits they agree on are checked once more against the model itself (one
        forward pass over the subset), so a shard file cannot claim points the model gets
        wrong."""
        from pagctl.evaluation.sharding import merged_state
        from pagctl.protocols import declared_budget
        from pagctl.robustness.engine import clean_correct_mask
        from pagctl.robustness.report import AttackReport
        from pagctl.robustness.state import AttackState

        merged = merged_state(AttackState, self.request, self.job.name, self.key(),
                              "evaluation")
        clean = clean_correct_mask(self.model, self.bundle.test, self.indices,
                                   batch_size=self.request.batch_size,
                                   device=self.request.device)
        if not bool((clean == merged.clean).all()):
            wrong = int((clean != merged.clean).sum())
            raise CheckpointError(
                f"{self.request.shard_dir}: the shards claim {wrong} point(s) classified "
                "otherwise than the model classifies them; they were not written by this "
                "model's evaluation: delete them and run the shards again")
        norm, eps = declared_budget(self.build(0), self.params)
        return AttackReport.from_state(merged, self.job.name, self.params, norm, eps,
                                       self.indices, self.request.seed)

