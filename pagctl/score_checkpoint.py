"""The files of a score run folder that training writes and reads back.

state.safetensors/state.json (model, EMA, Adam state, generator, counters: what
``resume=True`` continues from), model.safetensors/config.json (the weights a run ships),
the saved spec.json (checked on resume) and metrics.jsonl (trimmed back to the resumed
step). The training loop itself is `pagctl.score.train_score`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagctl import checkpoint
from pagctl.score_spec import ScoreSpec

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from pagctl.score_model import ScoreModel, ScoreModelConfig


def _truncate_metrics(run_dir: Path, keep_step: int) -> None:
    """Drop training records after ``keep_step`` (a resumed run writes them again)."""
    path = run_dir / checkpoint.METRICS_FILE
    if not path.is_file():
        return
    out = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("kind") == "score_train" \
                and int(rec.get("step", 0)) > keep_step:
            continue
        if isinstance(rec, dict) and rec.get("kind") == "score_done":
            continue
        out.append(line)
    checkpoint.atomic_write_text(path, "".join(out))


def _spec_hash(spec: ScoreSpec) -> str:
    import hashlib

    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]


def _read_run_spec(run_dir: Path) -> ScoreSpec:
    from pagctl.errors import CheckpointError

    path = run_dir / checkpoint.SPEC_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no {checkpoint.SPEC_FILE}; not a score run folder")
    return checkpoint.read_spec_file(path, ScoreSpec, "score spec")


def _save_state(run_dir: Path, model: ScoreModel, extra: dict[str, Tensor],
                opt: torch.optim.Optimizer, gen: torch.Generator, meta: dict[str, Any]) -> None:
    """state.safetensors: model, EMA, Adam tensors and the generator, with the counters in
    its metadata (so tensors and counters always come from one save); state.json a copy."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(extra)
    opt_tensors, opt_meta = checkpoint.optimizer_to_flat(opt)
    tensors.update(opt_tensors)
    tensors["rng.train"] = gen.get_state()
    full = json.dumps({**meta, "optimizer": opt_meta}, indent=2)
    checkpoint.atomic_save_tensors(tensors, run_dir / checkpoint.STATE_FILE,
                                   {"pagctl_state": full})
    checkpoint.atomic_write_text(run_dir / checkpoint.STATE_META_FILE, full + "\n")


def save_model(run_dir: Path, model: ScoreModel, config: ScoreModelConfig) -> None:
    """model.safetensors + config.json (atomic writes)."""
    import torch

    from pagctl import __version__

    meta = {"format": "pt", "pagctl_version": __version__, "torch_version": torch.__version__,
            "kind": "score_model", "network": config.network}
    checkpoint.atomic_save_tensors(dict(model.state_dict()), run_dir / checkpoint.MODEL_FILE,
                                   meta)
    checkpoint.atomic_write_text(run_dir / checkpoint.CONFIG_FILE,
                                 config.model_dump_json(indent=2) + "\n")
