"""Score-Based Gradients (SBG): g(x, t) = s(x_σ, σ, t) − s(x_σ, σ, ∅), x_σ = x + σ·ε.

s is a class-conditional score model trained with ``pagctl train-score``: s(·, σ, t)
estimates ∇ log p(x_σ | t) and s(·, σ, ∅) (its null class) ∇ log p(x_σ), so by Bayes' rule
the difference estimates ∇ log p(t | x_σ), the gradient of an ideal classifier of the noised
data. It is evaluated at a noised copy of the input because a score model is accurate only
at the noise levels it was trained on; the result is averaged over ``draws`` noise draws.

The noise level σ is a free choice: the method asks for a "moderate" level without publishing
a value. The default 0.2 (pixels in [0, 1]) was measured on the digits to give targets good
enough for PAG; it must lie inside the score model's training range.

Noise draws are reproducible. For training images (``index`` given) the noise of image i
comes from a generator seeded by a hash of (seed, i) — and, with ``shared_noise`` false, of
the target class as well — so every training image keeps the same targets all run long, as
a precomputed bank of targets would. Other inputs (``index`` None) draw from the source's
own generator, seeded at build time and again by ``reseed`` (align-score reseeds it per
batch, so its shards merge exactly). The global RNG is never used.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from pydantic import Field
from torch import Tensor

from pagctl.protocols import BuildContext, PluginParams
from pagctl.target_gradients._pool import check_call

_MASK63 = (1 << 63) - 1


def noise_seed(*parts: int) -> int:
    """A 63-bit generator seed from integers (blake2b of their decimal text)."""
    text = ":".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & _MASK63


class SBG:
    """Score-Based Gradients: conditional minus unconditional score of a trained score model.

    The scores are taken at a noised copy x_σ of the input (see the module docstring).
    ``model`` is the loaded `pagctl.score.model.ScoreModel` (eval mode, frozen) on the
    build context's device.
    """

    class Params(PluginParams):
        run: Path = Field(description="score run folder made by 'pagctl train-score' "
                          "(config.json + model.safetensors)")
        sigma: float = Field(
            default=0.2, gt=0, allow_inf_nan=False,
            description="noise level σ of x_σ = x + σ·ε (pixels in [0, 1]); the method's "
            "'moderate' level is unpublished; must lie in the score model's training range")
        draws: int = Field(default=1, ge=1, description="noise draws averaged per target")
        shared_noise: bool = Field(
            default=True, description="one noised copy per image shared by its K target "
            "classes (false: a fresh draw for every (image, class) pair)")
        seed: int | None = Field(default=None, description="seed of the noise; null = the "
                                 "run's seed")
        chunk_size: int = Field(default=512, ge=1, description="score-model evaluations per "
                                "forward pass; lower it if memory runs out. Does not change "
                                "the result")

    def __init__(self, params: Params, ctx: BuildContext) -> None:
        from pagctl.score.model import load_score_run

        self.params = params
        run = load_score_run(params.run, ctx.device)
        cfg = run.config
        if cfg.num_classes != ctx.num_classes:
            raise ValueError(f"the score model in {params.run} has {cfg.num_classes} classes "
                             f"but the data have {ctx.num_classes}; train a score model on "
                             "the same dataset (pagctl train-score)")
        if tuple(cfg.input_shape) != tuple(ctx.input_shape):
            raise ValueError(f"the score model in {params.run} takes inputs of shape "
                             f"{tuple(cfg.input_shape)} but the data are "
                             f"{tuple(ctx.input_shape)}; train a score model on the same "
                             "dataset (pagctl train-score)")
        if not cfg.sigma_min <= params.sigma <= cfg.sigma_max:
            raise ValueError(f"sigma {params.sigma} is outside the score model's training "
                             f"range [{cfg.sigma_min:g}, {cfg.sigma_max:g}]; choose sigma "
                             "inside it")
        self.model = run.model
        self.config = cfg
        self._device = next(self.model.parameters()).device
        self._seed = ctx.seed if params.seed is None else params.seed
        self._generator = torch.Generator().manual_seed(self._seed)

    def reseed(self, seed: int) -> None:
        """Restart the noise of inputs without an index from ``seed`` combined with the
        source's own seed (align-score reseeds per batch; the ``seed`` param still counts)."""
        self._generator.manual_seed(noise_seed(self._seed, seed))

    def _noise(self, n: int, k: int, classes: Tensor, index: Tensor | None) -> Tensor:
        """ε for every (draw, image[, class]). Shape: -> (D, N, 1 or K, C, H, W) on the CPU."""
        d = self.params.draws
        shape = tuple(self.config.input_shape)
        per = 1 if self.params.shared_noise else k
        if index is None:
            return torch.randn((d, n, per, *shape), generator=self._generator)
        rows = index.detach().to("cpu", torch.int64).reshape(-1)
        if rows.shape != (n,):
            raise ValueError(f"index must be int64 of shape ({n},), got {index.dtype} "
                             f"{tuple(index.shape)}")
        cls = classes.detach().to("cpu").tolist()
        out = torch.empty((d, n, per, *shape))
        gen = torch.Generator()
        for i, row in enumerate(rows.tolist()):
            for j in range(per):
                parts = (self._seed, row) if self.params.shared_noise else \
                    (self._seed, row, cls[i][j])
                gen.manual_seed(noise_seed(*parts))
                out[:, i, j] = torch.randn((d, *shape), generator=gen)
        return out

    def _eps(self, x: Tensor, y: Tensor) -> Tensor:
        """ε̂ of the score model in chunks. Shape: (M, C, H, W), (M,) -> (M, C, H, W)."""
        step = self.params.chunk_size
        return torch.cat([self.model(x[s: s + step], self.params.sigma, y[s: s + step])
                          for s in range(0, x.shape[0], step)])

    def __call__(
        self, inputs: Tensor, labels: Tensor, classes: Tensor, *, index: Tensor | None = None
    ) -> Tensor:
        """Shape: (N, C, H, W) in [0, 1], (N,), (N, K) -> (N, K, C, H, W) float32, the
        difference of scores averaged over the draws. ``index``: the inputs' training-set
        positions (their noise is then fixed per image); None: fresh noise."""
        check_call(inputs, classes, tuple(self.config.input_shape), self.config.num_classes)
        n, k = classes.shape
        shape = tuple(self.config.input_shape)
        dev = self._device
        sigma = self.params.sigma
        noise = self._noise(n, k, classes, index).to(dev)  # (D, N, P, C, H, W)
        d, per = noise.shape[0], noise.shape[2]
        x = inputs.detach().to(dev, torch.float32)
        cls = classes.detach().to(dev)
        null = self.model.null_class
        with torch.no_grad(), torch.autocast(device_type=dev.type, enabled=False):
            x_sigma = x[None, :, None] + sigma * noise  # (D, N, P, C, H, W)
            if self.params.shared_noise:
                # per noised image: the K conditional scores and one unconditional score
                reps = x_sigma[:, :, 0, None].expand(d, n, k + 1, *shape)
                ys = torch.cat([cls, torch.full((n, 1), null, device=dev,
                                                dtype=torch.int64)], dim=1)
                eps = self._eps(reps.reshape(-1, *shape),
                                ys[None].expand(d, n, k + 1).reshape(-1))
                eps = eps.reshape(d, n, k + 1, *shape)
                diff = eps[:, :, :k] - eps[:, :, k:]
            else:
                flat = x_sigma.reshape(-1, *shape)  # (D·N·K, ...)
                yc = cls[None].expand(d, n, per).reshape(-1)
                eps_c = self._eps(flat, yc)
                eps_u = self._eps(flat, torch.full_like(yc, null))
                diff = (eps_c - eps_u).reshape(d, n, per, *shape)
            target = -diff.mean(dim=0) / sigma  # s = −ε̂/σ
        return target.to(device=inputs.device, dtype=torch.float32)
