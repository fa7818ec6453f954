"""The one resumable evaluation state: what an evaluation has measured so far, in one file
keyed by the evaluation that wrote it.

An attack (`pagctl.robustness.state.AttackState`) and an alignment score
(`pagctl.align.AlignProgress`) keep different tensors, but the file around them is the same
mechanism, written once here: a safetensors file whose metadata holds the format's version,
the evaluation's *key* (`evaluation_key`: what it measures, its seed and batch size, and the
digests of its points, images, labels and model) and the digest of the whole payload
(`pagctl.checkpoint.save_checked`). It is saved atomically after every batch (a killed run
leaves the previous batch's state), and loaded only by the evaluation whose key it holds:
another version or another evaluation is refused naming what differs, a damaged or edited
file naming the file, and a payload that breaks its kind's invariants (`problem`) likewise.
A state resumes a run (``state``), is one shard's part (``shard``), and the N finished
parts merge into the whole (`merge`, driven by `pagctl.evaluation.sharding`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

if TYPE_CHECKING:
    from torch import Tensor

S = TypeVar("S", bound="KeyedState")

KEY_WORDS = {"model_sha256": "model weights", "data_sha256": "test images or labels",
             "indices_sha256": "test indices", "n": "number of points", "params": "params",
             "seed": "seed", "batch_size": "batch size"}
"""How a refusal names each field every key has ("the state was written for other model
weights"); each kind adds its own (`KeyedState.WORDS`)."""


def evaluation_key(measures: Mapping[str, Any], *, indices: Tensor, seed: int,
                   batch_size: int, model_sha256: str, data_sha256: str) -> dict[str, Any]:
    """What identifies one evaluation, for its resumable state and its shards: what it
    ``measures`` (an attack and its params, stages and precision; a source, its params and
    K), the seed and batch size (they fix every batch's randomness), and the digests of the
    subset's indices, of its images and labels (`pagctl.data.subset_digest`) and of the
    model (`pagctl.provenance.model_digest`). Computed once per evaluation, by its caller."""
    from pagctl.stats import indices_digest

    return {**measures, "n": len(indices), "indices_sha256": indices_digest(indices),
            "seed": seed, "batch_size": batch_size, "model_sha256": model_sha256,
            "data_sha256": data_sha256}


class KeyedState:
    """The file mechanism every evaluation's progress shares (module docstring).

    A kind declares its format (``VERSION``, ``METADATA_KEY``, ``WHAT``: how messages name
    its file, ``WORDS``: how they name its key's own fields) and writes its payload
    (`payload`, `restore`), its invariants (`problem`), whether it has ended
    (`unfinished`) and how N shards merge (`merge`); `save` and `load` are written here
    once.
    """

    VERSION: ClassVar[int]
    METADATA_KEY: ClassVar[str]
    WHAT: ClassVar[str]
    WORDS: ClassVar[dict[str, str]] = {}
    key: dict[str, Any]

    def payload(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The tensors and the metadata (besides version and key) that `restore` reads."""
        raise NotImplementedError

    @classmethod
    def restore(cls: type[S], key: dict[str, Any], tensors: dict[str, Tensor],
                meta: dict[str, Any]) -> S:
        """The state `payload` wrote; KeyError, TypeError or ValueError when incomplete."""
        raise NotImplementedError

    def problem(self) -> str | None:
        """The first invariant of its kind this state breaks, or None."""
        raise NotImplementedError

    def unfinished(self) -> str | None:
        """Where it stopped ("stage 2 of 3", "batch 4 not scored"), or None when it has
        measured every point it owns."""
        raise NotImplementedError

    @classmethod
    def merge(cls: type[S], parts: list[S]) -> S:
        """The whole evaluation's state from its N finished shards (``parts[i]`` is shard
        i/N); ValueError when they are not the N parts of one evaluation."""
        raise NotImplementedError

    def save(self, path: Path) -> None:
        """Write atomically, with the digest of the whole payload."""
        from pagctl.checkpoint import save_checked

        tensors, meta = self.payload()
        save_checked(path, tensors, self.METADATA_KEY,
                     {"version": self.VERSION, "key": self.key, **meta})

    @classmethod
    def load(cls: type[S], path: Path, key: dict[str, Any]) -> S:
        """The state at ``path``, which must have been written for ``key``; SpecError (one
        line, naming the file and what differs) otherwise, CheckpointError naming the file
        when it is damaged, edited, incomplete or breaks its kind's invariants."""
        from pydantic import ValidationError

        from pagctl.checkpoint import contradiction, load_checked

        tensors, meta = load_checked(path, cls.METADATA_KEY, cls.WHAT, version=cls.VERSION,
                                     expected=key, names={**KEY_WORDS, **cls.WORDS})
        try:
            state = cls.restore(key, tensors, meta)
        except (KeyError, TypeError, ValueError, AttributeError, ValidationError) as exc:
            raise contradiction(path, cls.WHAT, f"incomplete: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:80]}") from None
        problem = state.problem()
        if problem is not None:
            raise contradiction(path, cls.WHAT, problem)
        return state
