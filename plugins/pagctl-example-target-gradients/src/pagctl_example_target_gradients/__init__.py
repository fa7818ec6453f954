"""An example pagctl target-gradient plugin: a robust teacher's input gradients.

``robust_teacher`` sets g(x, t) = ∇ₓ log p_teacher(t | x), the input gradient of a teacher
model loaded from a pagctl run folder (for instance an adversarially trained or PAG-trained
run). Training a student with PAG against this source aligns the student's input gradients
with the teacher's, as in IGAM (Chan, Tay and Ong, "What it Thinks is Important is
Important: Robustness Transfers through Input Gradients", CVPR 2020).
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any, Literal

import torch
from pagctl.checkpoint import load_run
from pagctl.errors import CheckpointError
from pagctl.gradients import input_gradients
from pagctl.protocols import BuildContext, PluginParams
from pydantic import Field, field_validator
from torch import Tensor

__all__ = ["RobustTeacher"]
__version__ = "0.1.0"


class RobustTeacher:
    """Input gradients ∇ₓ log p(t|x) of a teacher model from a pagctl run folder (IGAM).

    The teacher is rebuilt with ``pagctl.checkpoint.load_run``, kept in eval mode with its
    parameters frozen, and differentiated with ``pagctl.gradients.input_gradients`` (the
    primitive behind the PAG loss and the alignment metric, so the three cannot drift apart),
    ``chunk_size`` images at a time and without autocast. With ``normalize`` each target
    gradient is divided by its L2 norm (a zero gradient stays zero); the cosine in the PAG
    loss ignores the scale, but unit vectors keep the values tame. ``labels`` and ``index``
    are not used: the teacher is evaluated on whatever images it is given.

    Shape: inputs (N, C, H, W) in [0, 1], labels (N,), classes (N, K) int64
    -> (N, K, C, H, W) float32 on the inputs' device, detached.
    """

    class Params(PluginParams):
        run: Path = Field(
            description="the teacher's pagctl run folder (e.g. runs/teacher), trained on "
            "data with the same classes and image shape as the student's")
        device: Literal["auto", "cpu", "cuda"] = Field(
            default="auto", description="where the teacher runs; auto = the training device")
        normalize: bool = Field(
            default=True, description="divide each target gradient by its L2 norm "
            "(a zero gradient stays zero)")
        chunk_size: int = Field(default=256, ge=1, description="images per teacher pass")

        @field_validator("run", mode="before")
        @classmethod
        def _path_like(cls, value: Any) -> Any:
            if not isinstance(value, (str, PathLike)) or not str(value).strip():
                raise ValueError("must be the path of the teacher's run folder, e.g. "
                                 "runs/teacher")
            return value

    def __init__(self, params: Params, ctx: BuildContext) -> None:
        self.params = params
        self.num_classes = ctx.num_classes
        self.input_shape = tuple(ctx.input_shape)
        self.device = _resolve_device(params.device, ctx.device)
        self.run_dir = params.run.expanduser()
        run = self.run_dir
        try:
            # Rebuilding the network initialises its weights from the global RNG before the
            # saved ones are loaded: fork it so that building this source draws nothing.
            with torch.random.fork_rng(devices=[]):
                loaded = load_run(run, device=self.device)
        except CheckpointError as exc:
            raise ValueError(f"params.run: cannot load the teacher ({exc})") from None
        teacher_classes = loaded.config.get("num_classes")
        if teacher_classes != ctx.num_classes:
            raise ValueError(
                f"the teacher in {run} has {teacher_classes} classes but the training data "
                f"has {ctx.num_classes}; use a teacher run trained on the same dataset")
        teacher_shape = _config_input_shape(loaded.config)
        if teacher_shape is not None and teacher_shape != self.input_shape:
            raise ValueError(
                f"the teacher in {run} takes images of shape (C, H, W) = {teacher_shape} but "
                f"the training data has {self.input_shape}; use a teacher run trained on "
                "the same dataset")
        teacher = loaded.model.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        probe = torch.zeros((1, *self.input_shape), device=self.device)
        try:
            with torch.no_grad():
                logits = teacher(probe)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ValueError(
                f"the teacher in {run} cannot take images of shape (C, H, W) = "
                f"{self.input_shape} ({first}); use a teacher run trained on the same "
                "dataset") from None
        if tuple(logits.shape) != (1, ctx.num_classes):
            raise ValueError(
                f"the teacher in {run} returns {logits.shape[-1]} logits but the training "
                f"data has {ctx.num_classes} classes; use a teacher run trained on the same "
                "dataset")
        self.teacher = teacher

    def __call__(
        self, inputs: Tensor, labels: Tensor, classes: Tensor, *, index: Tensor | None = None
    ) -> Tensor:
        """Shape: (N, C, H, W) in [0, 1], (N,), (N, K) int64 -> (N, K, C, H, W) float32."""
        self._check(inputs, classes)
        n = inputs.shape[0]
        chunks: list[Tensor] = []
        # The training step may run under bfloat16 autocast and no_grad; the teacher's
        # gradients are always computed in float32 (input_gradients enables grad itself).
        with torch.inference_mode(False), \
                torch.autocast(device_type=self.device.type, enabled=False):
            for lo in range(0, n, self.params.chunk_size):
                hi = min(n, lo + self.params.chunk_size)
                x = inputs[lo:hi].detach().to(device=self.device, dtype=torch.float32)
                grads = input_gradients(self.teacher, x, classes[lo:hi].to(self.device))
                if not bool(torch.isfinite(grads).all()):
                    raise RuntimeError(
                        f"the teacher in {self.run_dir} gave NaN or infinite input gradients; "
                        "check that run's weights")
                if self.params.normalize:
                    grads = _unit(grads)
                chunks.append(grads.to(inputs.device))
            if not chunks:  # N = 0
                return torch.zeros((0, classes.shape[1], *inputs.shape[1:]),
                                   dtype=torch.float32, device=inputs.device)
            return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def _check(self, inputs: Tensor, classes: Tensor) -> None:
        if inputs.dim() != 4 or tuple(inputs.shape[1:]) != self.input_shape:
            raise ValueError(f"inputs must have shape (N, {', '.join(map(str, self.input_shape))})"
                             f", got {tuple(inputs.shape)}")
        if not inputs.is_floating_point():
            raise ValueError(f"inputs must be float pixels in [0, 1], got {inputs.dtype}")
        if classes.dim() != 2 or classes.shape[0] != inputs.shape[0]:
            raise ValueError(f"classes must have shape (N, K) with N = {inputs.shape[0]}, got "
                             f"{tuple(classes.shape)}")
        if classes.dtype != torch.int64:
            raise ValueError(f"classes must be int64, got {classes.dtype}")
        if classes.numel() and bool(((classes < 0) | (classes >= self.num_classes)).any()):
            raise ValueError(f"classes must lie in [0, {self.num_classes})")


def _resolve_device(name: str, default: torch.device) -> torch.device:
    if name == "auto":
        return torch.device(default)
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("params.device: 'cuda' but CUDA is not available here; use 'auto' "
                         "or 'cpu'")
    return torch.device(name)


def _config_input_shape(config: dict[str, Any]) -> tuple[int, ...] | None:
    """(C, H, W) from a timm config's ``pretrained_cfg.input_size``; None when absent."""
    pretrained = config.get("pretrained_cfg")
    size = pretrained.get("input_size") if isinstance(pretrained, dict) else None
    if not isinstance(size, (list, tuple)) or len(size) != 3:
        return None
    try:
        return tuple(int(s) for s in size)
    except (TypeError, ValueError):
        return None


def _unit(grads: Tensor) -> Tensor:
    """Each (C, H, W) slice divided by its L2 norm; all-zero slices stay zero.
    Shape: (N, K, C, H, W) -> (N, K, C, H, W)."""
    norms = torch.linalg.vector_norm(grads.flatten(2), dim=2)
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    return grads / norms.reshape(*norms.shape, *([1] * (grads.dim() - 2)))
