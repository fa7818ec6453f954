"""Alignment of a model's input gradients with a target-gradient source.

The metric uses the same primitive as the training objective
(``pagctl.gradients.logits_and_input_gradients`` and ``pagctl.losses.cosine_alignment``), so
metric and objective cannot drift apart. Any registered source can be the reference,
whatever the model was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pagctl.errors import FieldError
from pagctl.evaluation.state import KeyedState
from pagctl.records import AlignRecord, Subset
from pagctl.stats import mean_interval, subset_record

if TYPE_CHECKING:
    import torch
    from pydantic import BaseModel
    from torch import Tensor, nn
    from torch.utils.data import Dataset

    from pagctl.data import DataBundle
    from pagctl.evaluation.request import EvaluationRequest
    from pagctl.protocols import TargetGradientSource



@dataclass
class AlignReport:
    """Cosine between ∇ₓ log p(t|x) and the source's g(x, t), over images and K targets.

    ``mean`` averages every (image, target) pair; ``interval`` is a 95% normal interval of
    that mean computed over images (each image's K cosines averaged first, so the pairs of
    one image are not counted as independent). ``fraction_positive``: images whose mean
    cosine is > 0. ``per_true_class``: mean by the image's label. ``per_target``: mean over
    pairs whose target is the image's own label (``true``) and over the others (``other``);
    None when no pair of that kind was sampled.
    """

    n: int
    classes_per_image: int
    mean: float
    interval: tuple[float, float]
    fraction_positive: float
    per_true_class: dict[str, float] = field(default_factory=dict)
    per_target: dict[str, float | None] = field(default_factory=dict)
    subset: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    seconds: float = 0.0
    per_image: list[float] = field(default_factory=list)
    """Each image's mean cosine over its K targets, in the subset's order."""
    source: str = ""
    """The source's registered name, and its validated params (set by whoever built it)."""
    source_params: dict[str, Any] = field(default_factory=dict)
    model_sha256: str | None = None
    """Which model was scored (`pagctl.provenance.model_digest`); the subset's
    ``data_sha256`` names the images."""
    indices: Tensor | None = field(default=None, repr=False, compare=False)
    """The scored points' positions in the test set, (n,) int64 (the subset's digests
    compare them)."""

    def to_record(self, params_given: dict[str, Any] | None = None) -> AlignRecord:
        """The metrics.jsonl record of this score (``params_given``: the source's params as
        the user typed them)."""
        record = AlignRecord(
            source=self.source, source_params=self.source_params, n=self.n,
            classes_per_image=self.classes_per_image, mean=self.mean, interval=self.interval,
            fraction_positive=self.fraction_positive, per_true_class=self.per_true_class,
            per_target=self.per_target, subset=Subset(**self.subset), seed=self.seed,
            seconds=self.seconds, per_image=[round(v, 6) for v in self.per_image])
        if params_given is not None:
            record.params_given = params_given
        if self.model_sha256 is not None:
            record.model_sha256 = self.model_sha256
        return record


def batch_seed(seed: int, batch: int) -> int:
    """The seed of batch ``batch``'s draws (its target classes, and a source's noise for
    unseen images), so a batch's draws do not depend on the batches scored before it."""
    return seed * 1_000_003 + batch


def alignment_report(
    model: nn.Module,
    dataset: Dataset[Any],
    indices: Tensor,
    source: TargetGradientSource,
    *,
    num_classes: int,
    classes_per_image: int,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = False,
) -> AlignReport:
    """Alignment of ``model`` with ``source`` on ``dataset[indices]`` (see AlignReport).

    Evaluated in eval mode (restored afterwards), in batches of ``batch_size``. Batch b
    draws its K classes per image without replacement from a generator seeded with
    ``batch_seed(seed, b)``, and restarts the source's own randomness from that seed
    (`pagctl.protocols.reseed_source`), so every batch is scored the same way whether the
    others are scored in the same process, before it, or at all (`score_batches` with a
    shard). The source is called with ``index=None`` (the images are treated as unseen test
    images).
    """
    from pagctl.evaluation.request import EvaluationRequest

    request = EvaluationRequest(batch_size=batch_size, device=device, seed=seed,
                                progress=progress)
    scored = score_batches(model, dataset, indices, source, request,
                           num_classes=num_classes, classes_per_image=classes_per_image)
    return scored.report(dataset, indices, classes_per_image=classes_per_image, seed=seed)


def score_batches(
    model: nn.Module,
    dataset: Dataset[Any],
    indices: Tensor,
    source: TargetGradientSource,
    request: EvaluationRequest,
    *,
    num_classes: int,
    classes_per_image: int,
    key: dict[str, Any] | None = None,
) -> AlignProgress:
    """Score the batches of ``dataset[indices]`` (those ``b % N == i`` with
    ``request.shard=(i, N)``) with ``classes_per_image`` targets per image, in
    ``request``'s batches, seed and device, as `alignment_report` does, and return their
    per-image and per-batch results. With ``request.state`` the progress is read from it
    to resume (it must have been written for ``key``, plus the shard for a shard) and
    rewritten after every batch."""
    import time

    import torch

    from pagctl.data import get_batch
    from pagctl.evaluation.sharding import owned_batches
    from pagctl.gradients import logits_and_input_gradients
    from pagctl.losses import cosine_alignment, sample_target_classes
    from pagctl.models import check_finite_outputs, eval_mode
    from pagctl.progress import ProgressBar
    from pagctl.protocols import reseed_source

    n, batch_size, device, seed = (len(indices), request.batch_size, request.device,
                                   request.seed)
    state_path = request.state
    batches = -(-n // batch_size)
    mine = owned_batches(batches, request.shard)
    key = dict(key or {})
    if request.shard is not None:
        key["shard"] = list(request.shard)
    state = (AlignProgress.load(state_path, key)
             if state_path is not None and state_path.exists()
             else AlignProgress.start(key, n, batch_size))
    start = time.perf_counter()
    prior = state.seconds
    todo = [b for b in mine if not bool(state.done[b])]
    scored = sum(min(batch_size, n - b * batch_size) for b in mine if bool(state.done[b]))
    with eval_mode(model), ProgressBar("align", sum(
            min(batch_size, n - b * batch_size) for b in mine),
            enabled=request.progress) as bar:
        bar.update(completed=scored)
        for b in todo:
            lo = b * batch_size
            x, y = get_batch(dataset, indices[lo: lo + batch_size])
            x, y = x.to(device), y.to(device)
            generator = torch.Generator().manual_seed(batch_seed(seed, b))
            reseed_source(source, batch_seed(seed, b))
            classes = sample_target_classes(y, num_classes, classes_per_image, generator)
            with torch.no_grad():
                targets = source(x, y, classes)
            logits, grads = logits_and_input_gradients(model, x, classes)
            check_finite_outputs(logits, "alignment")
            cos = cosine_alignment(grads, targets).double().cpu()
            is_true = (classes == y[:, None]).cpu()
            state.cosines[lo: lo + len(y)] = cos.mean(dim=1)
            state.sums[b] = torch.tensor([float(cos[is_true].sum()), float(is_true.sum()),
                                          float(cos[~is_true].sum()), float((~is_true).sum())],
                                         dtype=torch.float64)
            state.done[b] = True
            state.seconds = prior + time.perf_counter() - start
            if state_path is not None:
                state.save(state_path)
            scored_so_far = state.cosines[~state.cosines.isnan()]
            bar.update(advance=len(y), info=f"mean cos {float(scored_so_far.mean()):.3f}")
    state.seconds = prior + time.perf_counter() - start
    if state_path is not None:  # also a shard that owns no batch: its file says it is done
        state.save(state_path)
    return state


@dataclass(frozen=True)
class AlignmentJob:
    """Which alignment an evaluation scores: the registered target-gradient ``source``, its
    validated ``params``, and K = ``classes_per_image`` target classes drawn per image."""

    source: str
    params: BaseModel
    classes_per_image: int


def alignment_source(bundle: DataBundle, job: AlignmentJob,
                     request: EvaluationRequest) -> TargetGradientSource:
    """The job's source built for ``bundle`` on the request's device and seed (sources that
    need training images read ``bundle.train``; a cache folder for those that keep one)."""
    import torch

    from pagctl import registry
    from pagctl.build import build_context, default_cache_dir

    ctx = build_context(bundle, torch.device(request.device), request.seed,
                        default_cache_dir())
    built: TargetGradientSource = registry.target_gradients.instantiate(
        job.source, job.params, ctx, "source")
    return built


def evaluate_alignment(model: nn.Module, bundle: DataBundle, job: AlignmentJob,
                       request: EvaluationRequest, source: TargetGradientSource | None = None,
                       ) -> AlignReport | None:
    """What ``pagctl align-score`` and `pagctl.api.align_score` both measure: the alignment
    of ``model`` with ``job``'s registered source (``source``: that source already built by
    `alignment_source`, else built here) on the test points ``request`` asks for, K =
    ``job.classes_per_image`` targets per image, as a report that names its source, the
    model and the images it measured (`pagctl.provenance`), ready to be recorded. The
    request is checked first as every evaluation's is (`pagctl.evaluation`).

    Whole (resuming ``request.state`` when given); or, with ``request.shard=(i, N)``, shard
    i scored into its file in ``request.shard_dir`` (resuming it; returns None); or, with
    ``request.merge_shards=N``, the N finished shards there merged into the report of the
    unsharded score (the same per-image cosines and numbers, to the bit). FieldError when a
    shard is missing or unfinished, CheckpointError when a shard file is damaged or
    contradicts itself."""
    from pagctl.data import subset_digest
    from pagctl.evaluation.request import check_outputs
    from pagctl.evaluation.sharding import merged_state, progress_file
    from pagctl.evaluation.state import evaluation_key
    from pagctl.provenance import model_digest

    request.check()
    if request.precision != "float32":
        raise FieldError("precision", "alignment is scored in float32 only")
    num_classes = bundle.num_classes
    k = job.classes_per_image
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_classes:
        raise FieldError("classes_per_image", f"{k!r} target classes per image; the data has "
                         f"{num_classes} classes: give 1 to {num_classes}")
    dataset = bundle.test
    indices = request.points(len(dataset))  # type: ignore[arg-type]
    check_outputs(model, bundle, request.device)
    measured, points = model_digest(model), subset_digest(dataset, indices)
    key = evaluation_key({"source": job.source,
                          "params": job.params.model_dump(mode="json"),
                          "classes_per_image": k},
                         indices=indices, seed=request.seed, batch_size=request.batch_size,
                         model_sha256=measured, data_sha256=points)
    stem = f"align-{job.source}"
    if request.merge_shards is not None:
        scored = merged_state(AlignProgress, request, stem, key, "score")
    else:
        built = source if source is not None else alignment_source(bundle, job, request)
        path = progress_file(request, stem, key)
        scored = score_batches(model, dataset, indices, built, request.part(state=path),
                               num_classes=num_classes, classes_per_image=k, key=key)
        if request.shard is not None:
            return None
    report = scored.report(dataset, indices, classes_per_image=k, seed=request.seed)
    report.source, report.source_params = job.source, job.params.model_dump(mode="json")
    report.model_sha256, report.indices = measured, indices.clone()
    report.subset["data_sha256"] = points
    return report



@dataclass
class AlignProgress(KeyedState):
    """The per-image and per-batch results of an alignment score as it runs: what a shard
    file or an interrupted score keeps, and what shards merge from. Its file is the one
    evaluation state (`pagctl.evaluation.state.KeyedState`).

    Shape: cosines (n,) float64, each image's mean cosine over its K targets (NaN: not
    scored yet); sums (B, 4) float64, per batch the sum and count of the cosines whose
    target is the image's true class, then of the others; done (B,) bool. ``key`` names the
    score (source, params, seed, K, batch size, subset, images, weights);
    ``seconds``: time spent scoring.
    """

    key: dict[str, Any]
    batch_size: int
    cosines: Tensor
    sums: Tensor
    done: Tensor
    seconds: float = 0.0

    @classmethod
    def start(cls, key: dict[str, Any], n: int, batch_size: int) -> AlignProgress:
        """Nothing scored yet."""
        import torch

        batches = -(-n // batch_size)
        return cls(key=key, batch_size=batch_size,
                   cosines=torch.full((n,), float("nan"), dtype=torch.float64),
                   sums=torch.zeros((batches, 4), dtype=torch.float64),
                   done=torch.zeros(batches, dtype=torch.bool))

    VERSION: ClassVar[int] = 2
    METADATA_KEY: ClassVar[str] = "pagctl_align_state"
    WHAT: ClassVar[str] = "alignment shard"
    WORDS: ClassVar[dict[str, str]] = {"source": "source",
                                       "classes_per_image": "classes per image"}

    @property
    def finished(self) -> bool:
        """Whether every batch is scored."""
        return bool(self.done.all())

    def unfinished(self) -> str | None:
        """The first batch it owns (all, or its shard's) not scored yet, or None."""
        from pagctl.evaluation.sharding import owned_batches

        shard = self.key.get("shard")
        owned = owned_batches(self.done.numel(), tuple(shard) if shard else None)
        missing = [b for b in owned if not bool(self.done[b])]
        return f"its batch {missing[0]} not scored" if missing else None

    def payload(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        import torch

        return ({"cosines": self.cosines, "sums": self.sums, "done": self.done.to(torch.uint8)},
                {"seconds": self.seconds, "batch_size": self.batch_size})

    @classmethod
    def restore(cls, key: dict[str, Any], tensors: dict[str, Tensor],
                meta: dict[str, Any]) -> AlignProgress:
        import torch

        return cls(key=key, batch_size=int(meta["batch_size"]),
                   cosines=tensors["cosines"].to(torch.float64),
                   sums=tensors["sums"].to(torch.float64),
                   done=tensors["done"].to(torch.bool), seconds=float(meta["seconds"]))

    def problem(self) -> str | None:
        """The first way this progress contradicts itself, or None: sizes that are not the
        subset's, a scored batch with a missing or out-of-range cosine (or an unscored one
        with a value), or a batch whose sums do not add up to its images' cosines times K."""
        import torch

        n, k = int(self.key.get("n", -1)), int(self.key.get("classes_per_image", -1))
        size = self.batch_size
        batches = -(-n // size) if size > 0 and n >= 0 else -1
        if self.cosines.shape != (n,) or self.sums.shape != (batches, 4) \
                or self.done.shape != (batches,):
            return f"its tensors are not those of {n} images in batches of {size}"
        for b in range(batches):
            rows = self.cosines[b * size: (b + 1) * size]
            if not bool(self.done[b]):
                if not bool(rows.isnan().all()) or bool(self.sums[b].any()):
                    return f"batch {b} holds values but is not marked scored"
                continue
            if not bool(torch.isfinite(rows).all()) or bool((rows.abs() > 1 + 1e-6).any()):
                return f"batch {b} has a cosine that is missing or outside [-1, 1]"
            true_sum, true_count, other_sum, other_count = self.sums[b].tolist()
            if true_count + other_count != k * len(rows):
                return f"batch {b} counts {true_count + other_count:g} pairs, not K × images"
            if abs(true_sum + other_sum - k * float(rows.sum())) > 1e-6 * k * len(rows):
                return f"batch {b}'s sums do not add up to its images' cosines"
        return None

    @classmethod
    def merge(cls, parts: list[AlignProgress]) -> AlignProgress:
        """The whole score from its N finished shards (``parts[i]`` is shard i/N: its
        batches ``b % N == i``). ValueError when a part lacks one of its batches."""
        import torch

        first, count = parts[0], len(parts)
        out = cls.start(first.key, first.cosines.numel(), first.batch_size)
        size = first.batch_size
        for i, part in enumerate(parts):
            for b in range(i, first.done.numel(), count):
                if not bool(part.done[b]):
                    raise ValueError(f"shard {i}/{count} has not scored its batch {b}")
                rows = slice(b * size, (b + 1) * size)
                out.cosines[rows] = part.cosines[rows]
                out.sums[b] = part.sums[b]
                out.done[b] = True
        out.seconds = sum(part.seconds for part in parts)
        assert bool(torch.isfinite(out.cosines).all())
        return out

    def report(self, dataset: Dataset[Any], indices: Tensor, *, classes_per_image: int,
               seed: int) -> AlignReport:
        """The AlignReport of the finished score (the per-batch sums added in batch order,
        so a merged score equals the unsharded one to the bit)."""
        import torch

        from pagctl.data import labels_of

        images = self.cosines
        label = torch.as_tensor(labels_of(dataset)[indices.numpy()], dtype=torch.int64)
        true_sum = other_sum = 0.0
        true_count = other_count = 0
        for row in self.sums.tolist():
            true_sum += row[0]
            true_count += int(row[1])
            other_sum += row[2]
            other_count += int(row[3])
        n = int(images.numel())
        mean = float(images.mean()) if n else 0.0
        sd = float(images.std()) if n > 1 else 0.0
        return AlignReport(
            n=n, classes_per_image=classes_per_image, mean=mean,
            interval=mean_interval(mean, sd, n, low=-1.0, high=1.0),
            fraction_positive=float((images > 0).double().mean()) if n else 0.0,
            per_true_class={str(int(c)): float(images[label == c].mean())
                            for c in torch.unique(label)},
            per_target={"true": true_sum / true_count if true_count else None,
                        "other": other_sum / other_count if other_count else None},
            subset=subset_record(indices), seed=seed, seconds=self.seconds,
            per_image=images.tolist(),
        )


def mean_alignment(
    model: nn.Module,
    dataset: Dataset[Any],
    indices: Tensor,
    source: TargetGradientSource,
    *,
    num_classes: int,
    classes_per_image: int,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> float:
    """Mean over images and K sampled target classes of cos(grad_x log p(t|x), g(x, t)).

    The ``mean`` of :func:`alignment_report`. Range [-1, 1].
    """
    return alignment_report(model, dataset, indices, source, num_classes=num_classes,
                            classes_per_image=classes_per_image, batch_size=batch_size,
                            device=device, seed=seed).mean


def gradient_panels(model: nn.Module, x: Tensor, y: Tensor, source: TargetGradientSource,
                    num_classes: int) -> tuple[Tensor, Tensor]:
    """For every class t: the model's ∇ₓ log p(t|x) and the source's g(x, t), for a figure.
    Shape: (k, C, H, W), (k,) -> (k, num_classes, C, H, W) twice."""
    import torch

    from pagctl.gradients import input_gradients
    from pagctl.models import eval_mode

    classes = torch.arange(num_classes, device=x.device).repeat(x.shape[0], 1)
    with eval_mode(model):
        grads = input_gradients(model, x, classes)
    with torch.no_grad():
        targets = source(x, y, classes)
    return grads.detach(), targets.detach()
