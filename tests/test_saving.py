"""Weights that safetensors can hold are saved, exactly, by every command; weights it
cannot hold are refused before a run folder is begun: tied weights stored once and loaded
tied, other shared memory copied apart, damaged alias metadata one line, and unsaveable
state (dtype, sparse, meta, not a tensor) named with its fix."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tied_model import TIED_MODULE
from torch import nn

from pagctl.checkpoint import (
    ALIASES_KEY,
    MODEL_FILE,
    SPEC_FILE,
    atomic_save_tensors,
    check_saveable,
    load_run,
    load_tensors,
    read_metrics,
)
from pagctl.errors import CheckpointError, ModelError
from pagctl.trust import CodeTrust


class Tied(nn.Module):
    """An encoder and a decoder that share one weight, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(6, 6, bias=False)
        self.decoder = nn.Linear(6, 6, bias=False)
        self.decoder.weight = self.encoder.weight
        self.head = nn.Linear(6, 3)


def test_a_round_trip_is_exact_and_stores_a_tied_weight_once(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = torch.randn(4, 6)
    tensors = {
        "a": base, "same": base.view(4, 6), "detached": base.detach(),  # one view: aliases
        "transposed": base.t(), "row": base[1], "tail": base[2:],  # other views: copies
        "half": torch.randn(3).to(torch.bfloat16), "count": torch.tensor([3, -1]),
        "flags": torch.tensor([True, False]), "empty": torch.zeros(0, 2),
        "scalar": torch.tensor(2.5),
    }
    path = tmp_path / "t.safetensors"
    atomic_save_tensors(tensors, path, {"note": "kept"})
    with safe_open(str(path), framework="pt") as fh:
        meta, stored = fh.metadata(), set(fh.keys())
    assert json.loads(meta[ALIASES_KEY]) == {"same": "a", "detached": "a"}
    assert meta["note"] == "kept" and stored == set(tensors) - {"same", "detached"}
    back = load_tensors(path)
    assert set(back) == set(tensors)
    for key, value in tensors.items():  # bitwise, same dtype and shape
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    assert back["same"] is back["a"] and back["detached"] is back["a"]
    assert back["row"].untyped_storage().data_ptr() != back["a"].untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="reserved"):
        atomic_save_tensors(tensors, path, {ALIASES_KEY: "{}"})


def test_a_tied_module_is_still_tied_after_loading(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = Tied()
    atomic_save_tensors(dict(net.state_dict()), tmp_path / "m.safetensors")
    torch.manual_seed(1)
    again = Tied()
    again.load_state_dict(load_tensors(tmp_path / "m.safetensors"), strict=True)
    assert again.decoder.weight is again.encoder.weight
    for key, value in net.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    with torch.no_grad():  # one parameter: a change to one name is a change to both
        again.encoder.weight.add_(1)
    assert torch.equal(again.decoder.weight, again.encoder.weight)


@pytest.mark.parametrize(("aliases", "message"), [
    ('{"b": "missing"}', "makes 'b' the tensor 'missing', which the file does not hold"),
    ('{"a": "a"}', "makes 'a' the tensor 'a', but the file holds its own 'a'"),
    ("[1, 2]", f"metadata '{ALIASES_KEY}' is not a JSON object of tensor names"),
    ("{not json", f"metadata '{ALIASES_KEY}' is not a JSON object of tensor names"),
])
def test_damaged_alias_metadata_is_one_line(tmp_path: Path, aliases: str,
                                             message: str) -> None:
    path = tmp_path / "bad.safetensors"
    save_file({"a": torch.ones(2)}, str(path), metadata={ALIASES_KEY: aliases})
    with pytest.raises(CheckpointError) as info:
        load_tensors(path)
    text = str(info.value)
    assert message in text and "\n" not in text
    assert text.endswith("the file is damaged; re-run training or restore the file")


class _Extra(nn.Module):
    def get_extra_state(self) -> Any:
        return {"step": 3}

    def set_extra_state(self, state: Any) -> None:
        pass


@pytest.mark.parametrize(("value", "problem", "fix"), [
    (torch.zeros(2, dtype=torch.complex128), "has dtype torch.complex128",
     "convert it in the module to a dtype safetensors stores"),
    (torch.zeros(3).to_sparse(), "is a sparse tensor (torch.sparse_coo)", ".to_dense()"),
    (torch.zeros(2, device="meta"), "is on the meta device (it holds no values)",
     "materialise it"),
    ("text", "is a str, not a tensor", "keep only tensors"),
])
def test_unsaveable_state_is_named_with_its_fix(value: Any, problem: str, fix: str) -> None:
    fine = {"w": torch.zeros(2, dtype=torch.float16), "n": torch.zeros(1, dtype=torch.int64),
            "c": torch.zeros(1, dtype=torch.complex64), "b": torch.zeros(1, dtype=torch.bool)}
    check_saveable(fine, "model.arch: m")
    with pytest.raises(ModelError) as info:
        check_saveable({**fine, "bad": value}, "model.arch: m")
    text = str(info.value)
    assert text.startswith(f"model.arch: m: 'bad' {problem}, which safetensors")
    assert fix in text and "\n" not in text
    with pytest.raises(ModelError, match="'_extra_state' is a dict, not a tensor"):
        check_saveable(_Extra().state_dict(), "x")


FACTORIES = TIED_MODULE + '''

class Complex(Tied):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes)
        self.register_buffer("phase", torch.zeros(4, dtype=torch.complex128))


def tied(num_classes: int) -> nn.Module:
    return Tied(num_classes)


def complex128(num_classes: int) -> nn.Module:
    return Complex(num_classes)
'''


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``tiedfactories.py`` in the working folder (``tmp_path``), imported anew."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiedfactories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("tiedfactories", None)
    return importlib.import_module("tiedfactories")


FAST = ["train.epochs=2", "data.batch_size=128", "eval.attack=null", "eval.limit=20",
        "eval.align_source=null", "model.kwargs={}"]


def _spec(arch: str, out: str) -> Any:
    from pagctl.spec import load_spec

    return load_spec("digits-vanilla", [*FAST, f"model.arch={arch}", f"out_dir={out}"])


def test_training_a_tied_model_saves_its_weights_every_epoch(factories: Any) -> None:
    from pagctl.train import train

    seen: list[int] = []

    def after_step(epoch: int, step: int) -> None:
        if epoch == 1 and step == 0:  # epoch 1's weights are on disk, tied
            loaded = load_run(Path("runs/tied"), trust=CodeTrust.of(True))
            net: Any = loaded.model.net
            assert net.decoder.weight is net.encoder.weight
            seen.append(epoch)

    result = train(_spec("tiedfactories:tied", "runs/tied"), device="cpu", progress=False,
                   on_step=after_step, trust=CodeTrust.of(True))
    assert result.epochs_done == 2 and seen == [1]
    assert [r.epoch for r in read_metrics(Path("runs/tied")).records] == [1, 2]  # type: ignore[union-attr]
    with safe_open(f"runs/tied/{MODEL_FILE}", framework="pt") as fh:
        assert json.loads(fh.metadata()[ALIASES_KEY]) == {"decoder.weight": "encoder.weight"}


def test_an_unsaveable_model_is_refused_before_the_folder_is_begun(
        pagctl: Any, factories: Any) -> None:
    from pagctl.train import train

    with pytest.raises(ModelError, match=r"^model.arch: tiedfactories:complex128: 'phase' "
                       r"has dtype torch.complex128, which safetensors"):
        train(_spec("tiedfactories:complex128", "runs/c"), device="cpu", progress=False,
              trust=CodeTrust.of(True))
    assert not Path("runs/c").exists()
    got = pagctl("import", "--model", "tiedfactories:complex128", "--dataset", "digits",
                 "--out", "runs/i")
    assert got.code == 2 and len(got.stderr.strip().splitlines()) == 1, got.stderr
    assert "'phase' has dtype torch.complex128" in got.stderr
    assert not Path("runs/i").exists() and not Path(f"runs/i/{SPEC_FILE}").exists()
