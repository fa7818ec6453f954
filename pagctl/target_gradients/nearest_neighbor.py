"""Nearest Neighbour (NN): r(x, t) = argmin over training images x̂ of class t,
x̂ ≠ x, of ‖x − x̂‖₂ in pixel space; g(x, t) = r(x, t) − x.

"x̂ ≠ x" is read as "a different image": x itself and every exact copy of it are skipped.
When class t holds no other image (e.g. ``pool_size=1`` and x is that image), g(x, t) = 0,
which makes the PAG term of that pair constant.

For training images the answer is precomputed at build time as an (N, num_classes) table of
training-set positions (cached on disk); other inputs (test images) are searched on the fly.
Distances are computed block by block (at most ``chunk_size`` × ``chunk_size``), never as a
full N × N matrix.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field
from torch import Tensor

from pagctl.protocols import BuildContext, PluginParams
from pagctl.target_gradients._pool import check_call, class_members, load_pool

_LOG = logging.getLogger(__name__)
_CACHE_FORMAT = 1
# Pairs whose expanded squared distance is below this fraction of ‖a‖² + ‖b‖² may be
# rounding noise (float32 expansion error grows like dimension × 6e-8): recompute them exactly.
_NEAR_ZERO = 1e-3
# Candidates this close (relative) to a row's minimum are re-measured exactly: several times
# the worst float32 expansion error, and small enough that shortlists stay a few long.
_NEAR_TIE = 1e-4


@dataclass(frozen=True)
class _Pool:
    """The candidate representatives, grouped by class.

    Shape: images (P, D) float32 raw pixels; index (P,) training-set positions; norms (P,)
    squared norms of ``images - center``; center (D,); bounds[c] = (start, end) of class c.
    """

    images: Tensor
    index: Tensor
    norms: Tensor
    center: Tensor
    bounds: tuple[tuple[int, int], ...]


def select_pool(members: list[Tensor], pool_size: int | None, seed: int) -> list[Tensor]:
    """Per class, all positions (``pool_size`` None or ≥ the class size) or a seeded random
    subset of ``pool_size`` of them, sorted. Shape: [(n_c,)] -> [(min(n_c, pool_size),)]."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for m in members:
        m = m.cpu()
        if pool_size is None or pool_size >= m.numel():
            chosen.append(m)
        else:
            pick = torch.randperm(m.numel(), generator=generator)[:pool_size]
            chosen.append(m[pick].sort().values)
    return chosen


def _make_pool(images: Tensor, chosen: list[Tensor]) -> _Pool:
    index = torch.cat(chosen).to(images.device)
    flat = images.flatten(1)[index]
    center = flat.mean(dim=0)
    # Centring shrinks the norms in ‖a‖² + ‖b‖² − 2ab, hence its cancellation error.
    norms = (flat - center).pow(2).sum(dim=1)
    bounds, start = [], 0
    for m in chosen:
        bounds.append((start, start + m.numel()))
        start += m.numel()
    return _Pool(images=flat, index=index, norms=norms, center=center, bounds=tuple(bounds))


def _search(queries: Tensor, pool: _Pool, cls: int, chunk_size: int,
            self_position: Tensor | None) -> Tensor:
    """Nearest image of class ``cls`` in the pool for each query, skipping exact copies of the
    query and, where ``self_position`` ≥ 0, that pool position. Equally distant candidates
    resolve to the lowest position, whatever ``chunk_size``.

    The float32 expansion ‖a‖² + ‖b‖² − 2ab only shortlists: candidates within its rounding
    error of each row's minimum are re-measured exactly (float64 differences), so the answer
    equals a brute-force search. Shape: queries (Q, D) raw pixels on the pool's device,
    self_position (Q,) positions within the class -> (Q,) positions within the class, −1
    where no candidate is left.
    """
    start, end = pool.bounds[cls]
    candidates = pool.images[start:end]
    cand_norms = pool.norms[start:end]
    out = torch.full((queries.shape[0],), -1, dtype=torch.int64, device=queries.device)
    for qs in range(0, queries.shape[0], chunk_size):
        q_raw = queries[qs : qs + chunk_size]
        q = q_raw - pool.center
        q_norms = q.pow(2).sum(dim=1)
        rows = torch.arange(q.shape[0], device=q.device)
        best_d = torch.full((q.shape[0],), float("inf"), dtype=torch.float64, device=q.device)
        best_i = torch.full((q.shape[0],), -1, dtype=torch.int64, device=q.device)
        for ps in range(0, candidates.shape[0], chunk_size):
            p_raw = candidates[ps : ps + chunk_size]
            p = p_raw - pool.center
            p_norms = cand_norms[ps : ps + p.shape[0]]
            d2 = (q_norms[:, None] + p_norms[None, :] - 2.0 * (q @ p.T)).clamp_min_(0.0)
            if self_position is not None:
                own = self_position[qs : qs + q.shape[0]] - ps
                hit = (own >= 0) & (own < p.shape[0])
                d2[rows[hit], own[hit]] = float("inf")
            # Pairs the expansion cannot tell from 0: measure exactly, drop exact copies.
            r, c = torch.nonzero(d2 <= _NEAR_ZERO * (q_norms[:, None] + p_norms[None, :]),
                                 as_tuple=True)
            exact = _exact_squared(q_raw, p_raw, r, c)
            d2[r, c] = torch.where(exact == 0, float("inf"), exact).to(d2.dtype)
            # Shortlist each row's near-minimal candidates and pick among them exactly.
            shortlist = _NEAR_TIE * (q_norms + p_norms.max())
            row_min = d2.amin(dim=1)
            r, c = torch.nonzero((d2 <= (row_min + shortlist)[:, None]) & torch.isfinite(d2),
                                 as_tuple=True)
            exact = _exact_squared(q_raw, p_raw, r, c)
            block_d = torch.full_like(best_d, float("inf")).scatter_reduce(0, r, exact, "amin")
            at_min = exact == block_d[r]
            block_i = torch.full_like(best_i, torch.iinfo(torch.int64).max).scatter_reduce(
                0, r[at_min], c[at_min], "amin")
            # Blocks come in increasing position, so a tie keeps the earlier candidate.
            better = block_d < best_d
            best_d = torch.where(better, block_d, best_d)
            best_i = torch.where(better, block_i + ps, best_i)
        out[qs : qs + q.shape[0]] = torch.where(torch.isinf(best_d), -1, best_i)
    return out


def _exact_squared(a: Tensor, b: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """Squared distances of the pairs (a[i], b[j]) in float64. float64 differences of float32
    pixels are exact, so the result is 0 only for identical images.
    Shape: a (q, D), b (p, D), i and j (M,) -> (M,) float64."""
    out = torch.empty(i.shape[0], dtype=torch.float64, device=a.device)
    block = max(1, 2**22 // max(1, a.shape[1]))  # bounds the (block, D) temporaries
    for s in range(0, i.shape[0], block):
        diff = a[i[s : s + block]].double() - b[j[s : s + block]].double()
        out[s : s + block] = diff.pow(2).sum(dim=1)
    return out


def _positions(pool: _Pool, n: int) -> Tensor:
    """Pool position of each training image, −1 outside the pool. Shape: -> (n,) int64."""
    position = torch.full((n,), -1, dtype=torch.int64, device=pool.index.device)
    position[pool.index] = torch.arange(pool.index.numel(), device=pool.index.device)
    return position


def _compute_table(images: Tensor, pool: _Pool, chunk_size: int) -> Tensor:
    """For every training image and class, the training-set position of its nearest pool
    image of that class other than itself (−1: none). Shape: (N, C, H, W) -> (N, num_classes).
    """
    flat = images.flatten(1)
    position = _positions(pool, flat.shape[0])
    table = torch.full((flat.shape[0], len(pool.bounds)), -1, dtype=torch.int64,
                       device=flat.device)
    for cls, (start, end) in enumerate(pool.bounds):
        inside = (position >= start) & (position < end)
        own = torch.where(inside, position - start, -1)
        found = _search(flat, pool, cls, chunk_size, own)
        table[:, cls] = torch.where(found >= 0, pool.index[(found + start).clamp_max(end - 1)],
                                    -1)
    return table


class NearestNeighbor:
    """Point from x toward its nearest training image of each target class.

    ``table`` (N, num_classes) int64: for training image i and class t, the training-set
    position of r(x_i, t), or −1 when class t has no other image in the pool.
    """

    class Params(PluginParams):
        pool_size: int | None = Field(
            default=None, ge=1, description="candidate images per class: null = every training "
            "image of the class, else a seeded random subset of this many",
        )
        seed: int | None = Field(
            default=None, description="seed of the pool subset; null = the run's seed",
        )
        chunk_size: int = Field(
            default=4096, ge=1, description="rows (and columns) per distance block; lower it "
            "if the build runs out of memory. Does not change the result",
        )
        cache: bool = Field(
            default=True, description="store the precomputed table in the run's cache "
            "directory, keyed by the training data's fingerprint and these parameters",
        )

    def __init__(self, params: Params, ctx: BuildContext) -> None:
        self.params = params
        self._num_classes = ctx.num_classes
        images, labels = load_pool(ctx, "nearest_neighbor")
        members = class_members(labels, ctx.num_classes, "nearest_neighbor")
        seed = ctx.seed if params.seed is None else params.seed
        self._pool = _make_pool(images, select_pool(members, params.pool_size, seed))
        n = images.shape[0]
        self._image_shape = tuple(images.shape[1:])
        self._position = _positions(self._pool, n)
        cache_file = self._cache_file(ctx, n)
        table = (_read_cache(cache_file, self._pool.index, labels, ctx.num_classes)
                 if cache_file else None)
        if table is None:
            table = _compute_table(images, self._pool, params.chunk_size)
            if cache_file is not None:
                _write_cache(cache_file, table, self._pool.index)
        self.table: Tensor = table.to(images.device)

    def _cache_file(self, ctx: BuildContext, n: int) -> Path | None:
        if not self.params.cache or ctx.cache_dir is None or ctx.data_fingerprint is None:
            return None
        key = {
            "format": _CACHE_FORMAT,
            "source": "nearest_neighbor",
            "fingerprint": ctx.data_fingerprint,
            "num_images": n,
            "num_classes": ctx.num_classes,
            "input_shape": list(ctx.input_shape),
            "pool_size": self.params.pool_size,
            # The seed only matters when it draws a subset.
            "seed": None if self.params.pool_size is None
            else (ctx.seed if self.params.seed is None else self.params.seed),
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return Path(ctx.cache_dir) / f"nearest_neighbor-{digest}.safetensors"

    def __call__(
        self, inputs: Tensor, labels: Tensor, classes: Tensor, *, index: Tensor | None = None
    ) -> Tensor:
        """Shape: (N, C, H, W) in [0, 1], (N,), (N, K) -> (N, K, C, H, W) = r(x, t) − x
        (zero where class t has no candidate). ``index``: the inputs' training-set
        positions (table lookup); None searches the pool."""
        check_call(inputs, classes, self._image_shape, self._num_classes)
        device = self.table.device
        cls = classes.to(device)
        if index is not None:
            rows = index.to(device)
            if rows.shape != (inputs.shape[0],) or rows.dtype != torch.int64:
                raise ValueError(f"index must be int64 of shape ({inputs.shape[0]},), got "
                                 f"{rows.dtype} {tuple(rows.shape)}")
            if rows.numel() and bool(((rows < 0) | (rows >= self.table.shape[0])).any()):
                raise ValueError(f"index must lie in [0, {self.table.shape[0]})")
            chosen = self.table[rows].gather(1, cls)
            slots = torch.where(chosen >= 0, self._position[chosen.clamp_min(0)], -1)
        else:
            slots = self._search_slots(inputs.detach().to(device, torch.float32), cls)
        reps = self._pool.images[slots.clamp_min(0)].reshape(*slots.shape, *self._image_shape)
        reps = reps.to(device=inputs.device, dtype=inputs.dtype)
        target = reps - inputs.unsqueeze(1)
        missing = (slots < 0).to(inputs.device).reshape(*slots.shape, 1, 1, 1)
        return target.masked_fill(missing, 0.0)

    def _search_slots(self, inputs: Tensor, classes: Tensor) -> Tensor:
        """Pool positions of the nearest candidates. Shape: (N, C, H, W), (N, K) -> (N, K)."""
        flat = inputs.flatten(1)
        slots = torch.full(classes.shape, -1, dtype=torch.int64, device=classes.device)
        for cls in torch.unique(classes).tolist():
            start = self._pool.bounds[cls][0]
            found = _search(flat, self._pool, cls, self.params.chunk_size, None)
            pos = torch.where(found >= 0, found + start, -1)
            slots = torch.where(classes == cls, pos[:, None], slots)
        return slots


def _read_cache(path: Path, pool_index: Tensor, labels: Tensor,
                num_classes: int) -> Tensor | None:
    """The cached table, or None when the file is missing, unreadable or inconsistent with
    this training set and pool (it is then recomputed)."""
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        stored = load_file(str(path))
        table = stored["table"].to(labels.device)
        stored_pool = stored["pool_index"].to(labels.device)
    except Exception as exc:  # any unreadable or truncated file is simply recomputed
        _LOG.warning("nearest_neighbor: ignoring unreadable cache %s (%s)", path, exc)
        return None
    n = labels.shape[0]
    ok = (
        table.dtype == torch.int64 and table.dim() == 2 and table.shape[0] == n
        and table.shape[1] == num_classes and torch.equal(stored_pool, pool_index)
        and bool(((table >= -1) & (table < n)).all())
    )
    if ok:
        in_pool = torch.zeros(n, dtype=torch.bool, device=labels.device)
        in_pool[pool_index] = True
        hits = table.clamp_min(0)
        cls = torch.arange(table.shape[1], device=labels.device).expand_as(table)
        valid = (table < 0) | (in_pool[hits] & (labels[hits] == cls))
        ok = bool(valid.all())
    if not ok:
        _LOG.warning("nearest_neighbor: cache %s does not match the data; recomputing", path)
        return None
    return table


def _write_cache(path: Path, table: Tensor, pool_index: Tensor) -> None:
    """Write atomically (temporary file, then rename); a failure only logs a warning."""
    from pagctl.checkpoint import atomic_save_tensors

    try:
        atomic_save_tensors({"table": table, "pool_index": pool_index}, path,
                            {"format": str(_CACHE_FORMAT)})
    except OSError as exc:
        _LOG.warning("nearest_neighbor: could not write cache %s (%s)", path, exc)
