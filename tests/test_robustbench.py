"""RobustBench interop: zoo entries imported from RobustBench's cache (``robustbench:<name>``),
checked against RobustBench's own loader; RobustBench's protocol (``pagctl benchmark``); the
model-card fields of the exported JSON."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import envelope_records
from test_data import write_cifar10

from pagctl.checkpoint import load_run

pytestmark = pytest.mark.skipif(importlib.util.find_spec("robustbench") is None,
                                reason="needs robustbench (pip install 'pagctl[robustbench]')")

ZOO_NAME = "Ding2020MMA"
"""A small cifar10 Linf entry of the zoo (WideResNet-28-4, 5.8M parameters) that normalises
its inputs inside (per image)."""


@pytest.fixture(scope="module")
def zoo_net() -> torch.nn.Module:
    """The zoo's own network for `ZOO_NAME`, seeded random weights."""
    from pagctl.robustbench_zoo import zoo_entry

    torch.manual_seed(0)
    net: torch.nn.Module = zoo_entry(ZOO_NAME, "cifar10", "Linf")["model"]()
    return net.eval()


@pytest.fixture
def cache(tmp_path: Path, zoo_net: torch.nn.Module, monkeypatch: pytest.MonkeyPatch,
          ) -> Path:
    """A working folder holding RobustBench's cache layout (``models/cifar10/Linf/<name>.pt``,
    a dict with ``state_dict`` whose keys carry DataParallel's ``module.``, as the zoo's
    files do) and a tiny CIFAR-10 in torchvision's layout (``data/``)."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "models" / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    state = {f"module.{k}": v for k, v in zoo_net.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 99}, folder / f"{ZOO_NAME}.pt")
    write_cifar10(tmp_path / "data")
    return tmp_path


def _reference(cache: Path) -> torch.nn.Module:
    """The model as RobustBench's own ``load_model`` loads it from the cache (the file is
    there: it downloads nothing)."""
    from pagctl.robustbench_zoo import zoo_entry

    zoo_entry(ZOO_NAME, "cifar10", "Linf")  # imports the zoo as pagctl does
    from robustbench.utils import load_model

    model: torch.nn.Module = load_model(ZOO_NAME, model_dir=str(cache / "models"),
                                        dataset="cifar10", threat_model="Linf")
    return model.eval()


def test_a_zoo_entry_imports_from_the_cache_with_robustbenchs_own_logits(
        pagctl: Any, cache: Path) -> None:
    """``pagctl import --model robustbench:NAME`` reads the cached file as RobustBench does,
    records the entry and the file's digest, puts no normalisation in front of the zoo model
    (it normalises inside), and the folder opens without --trust-code (installed code, as
    timm's) to give the logits of RobustBench's own loader on the same weights."""
    got = pagctl("import", "--model", f"robustbench:{ZOO_NAME}", "--threat-model", "Linf",
                 "--dataset", "cifar10", "--data-dir", "data", "--out", "runs/zoo",
                 "--format", "json")
    assert got.code == 0, got.stderr
    [record] = envelope_records(got.stdout, "import")
    pt = cache / "models" / "cifar10" / "Linf" / f"{ZOO_NAME}.pt"
    assert record["checkpoint"] == str(pt.resolve())
    assert record["checkpoint_sha256"] == hashlib.sha256(pt.read_bytes()).hexdigest()
    assert (record["container"], record["stripped_prefix"]) == ("state_dict", "module.")
    assert record["zoo"] == {"source": "robustbench", "name": ZOO_NAME, "dataset": "cifar10",
                             "threat_model": "Linf",
                             "model_dir": str((cache / "models").resolve())}
    assert record["mean"] == [0.0] * 3 and record["std"] == [1.0] * 3
    spec = json.loads((cache / "runs/zoo/spec.json").read_text())
    assert spec["model"]["arch"] == f"robustbench:{ZOO_NAME}"
    assert spec["model"]["kwargs"] == {"dataset": "cifar10", "threat_model": "Linf"}
    assert (cache / "runs/zoo/model.safetensors").is_file()

    loaded = load_run(cache / "runs/zoo")  # no trust given: the zoo is installed code
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), _reference(cache)(x))


def test_a_zoo_entry_imports_with_a_held_out_file_as_its_test_split(
        pagctl: Any, cache: Path) -> None:
    """``--dataset tensors --data-dir FILE`` with the entry's zoo dataset given apart
    (``--set model.kwargs.dataset=cifar10``): the file is the run's test split; without the
    zoo dataset, one line says how to name it."""
    import numpy as np

    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    np.savez(cache / "held.npz", x=x.numpy(), y=np.arange(6) % 10)
    argv = ["import", "--model", f"robustbench:{ZOO_NAME}", "--dataset", "tensors",
            "--data-dir", "held.npz", "--set", "data.num_classes=10"]
    refused = pagctl(*argv, "--out", "runs/no")
    assert refused.code == 2, refused.stderr
    assert "--set model.kwargs.dataset=cifar10" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (cache / "runs/no").exists()
    got = pagctl(*argv, "--set", "model.kwargs.dataset=cifar10", "--out", "runs/held",
                 "--format", "json")
    assert got.code == 0, got.stderr
    [record] = envelope_records(got.stdout, "import")
    assert record["n_check"] == 6 and record["zoo"]["dataset"] == "cifar10"
    loaded = load_run(cache / "runs/held")
    with torch.no_grad():
        assert torch.equal(loaded.model(x), _reference(cache)(x))


class _Payload:
    """Unpickling it would create a marker file: what a zoo file must never get to do."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (Path.touch, ("ran.txt",))


def test_a_zoo_file_with_code_in_it_is_refused_unrun(pagctl: Any, cache: Path) -> None:
    pt = cache / "models" / "cifar10" / "Linf" / f"{ZOO_NAME}.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": _Payload()}, pt)
    got = pagctl("import", "--model", f"robustbench:{ZOO_NAME}", "--dataset", "cifar10",
                 "--data-dir", "data", "--out", "runs/bad")
    assert got.code == 2, got.stderr
    assert "--model-dir: " in got.stderr and "torch.load(weights_only=True) refused it" in \
        got.stderr and "fetch the file again" in got.stderr
    assert len(got.stderr.strip().splitlines()) == 1
    assert not (cache / "ran.txt").exists() and not (cache / "runs/bad").exists()


def test_the_api_imports_the_same_weights(cache: Path) -> None:
    import pagctl.api as pg

    result = pg.import_model("runs/api", f"robustbench:{ZOO_NAME}", "cifar10",
                             threat_model="Linf", model_dir=cache / "models", root="data")
    assert result.record["zoo"]["name"] == ZOO_NAME
    pt = cache / "models" / "cifar10" / "Linf" / f"{ZOO_NAME}.pt"
    assert result.record["checkpoint_sha256"] == hashlib.sha256(pt.read_bytes()).hexdigest()
    loaded = load_run(cache / "runs/api")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), _reference(cache)(x))


def test_an_absent_file_is_refused_with_how_to_fetch_it(pagctl: Any, cache: Path) -> None:
    """No file in the cache: one line naming the file expected, RobustBench's call that
    fetches it and the Google Drive id; nothing written, nothing downloaded."""
    got = pagctl("import", "--model", f"robustbench:{ZOO_NAME}", "--dataset", "cifar10",
                 "--data-dir", "data", "--model-dir", "elsewhere", "--out", "runs/none")
    assert got.code == 2 and len(got.stderr.strip().splitlines()) == 1, got.stderr
    line = got.stderr.strip()
    assert line.startswith(f"error: --model-dir: elsewhere/cifar10/Linf/{ZOO_NAME}.pt: no "
                           "such file"), line
    assert f"robustbench.utils.load_model('{ZOO_NAME}', model_dir='elsewhere'" in line
    assert "19Q_rIIHXsYzxZ0WcZdqT-N2OD7MfgoZ0" in line and "does not download" in line
    assert not (cache / "runs/none").exists() and not (cache / "elsewhere").exists()


@pytest.mark.parametrize(("argv", "expected"), [
    (["--model", "robustbench:Ding2020MMAA"], "did you mean 'Ding2020MMA'?"),
    (["--model", f"robustbench:{ZOO_NAME}", "--threat-model", "L3"],
     "model.kwargs.threat_model: 'L3' is not one of Linf, L2"),
    (["--model", "pagctl_small_cnn", "--threat-model", "Linf"],
     "--threat-model: names a RobustBench zoo entry's threat model"),
    (["--model", "pagctl_small_cnn", "--model-dir", "models"],
     "--model-dir: RobustBench's cache, read for robustbench: models only"),
])
def test_bad_zoo_options_are_one_line(pagctl: Any, cache: Path, argv: list[str],
                                      expected: str) -> None:
    got = pagctl("import", *argv, "--dataset", "cifar10", "--data-dir", "data", "--out",
                 "runs/bad")
    assert got.code == 2 and len(got.stderr.strip().splitlines()) == 1, got.stderr
    assert expected in got.stderr
    assert not (cache / "runs/bad").exists()


def test_without_the_package_the_fix_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from pagctl.errors import SpecError
    from pagctl.robustbench_zoo import zoo_entry

    for name in [m for m in sys.modules if m == "robustbench" or m.startswith("robustbench.")]:
        monkeypatch.delitem(sys.modules, name)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "robustbench" else real(name, *a))
    with pytest.raises(SpecError, match=r"pip install 'pagctl\[robustbench\]'$"):
        zoo_entry(ZOO_NAME, "cifar10", "Linf")


def test_a_zoo_name_is_no_import_path() -> None:
    from pagctl.trust import is_import_path

    assert not is_import_path(f"robustbench:{ZOO_NAME}")
    assert is_import_path("robustbenchx:make")


def test_the_protocol_writes_every_model_card_field(pagctl: Any, cache: Path) -> None:
    """``pagctl benchmark`` is attack's AutoAttack 'standard' at 8/255 (Linf) on the first N
    points, exported as RobustBench's model-info JSON: every field of its cards, in its
    order, the ones given with --card as typed and typed, the rest null or decided."""
    assert pagctl("import", "--model", f"robustbench:{ZOO_NAME}", "--dataset", "cifar10",
                  "--data-dir", "data", "--out", "runs/zoo").code == 0
    got = pagctl("benchmark", "runs/zoo", "--n", "2", "--param", "steps=1", "--param",
                 "square_queries=2", "--data-dir", "data", "--export", "out", "--no-progress",
                 "--card", "link=https://example.org/paper", "--card", "venue=ICLR 2020",
                 "--card", "additional_data=false", "--card", "reported=47.18",
                 "--card", "architecture=WideResNet-28-4")
    assert got.code == 0, got.stderr
    assert "steps=1, square_queries=2 is weaker than RobustBench's protocol" in got.stderr
    [path] = (cache / "out").glob("*.robustbench.json")
    assert path.name == f"autoattack-linf-eps{8 / 255:.6g}.robustbench.json"
    entry = json.loads(path.read_text())
    assert list(entry)[:13] == [
        "link", "name", "authors", "additional_data", "number_forward_passes", "dataset",
        "venue", "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote"]
    assert entry["link"] == "https://example.org/paper" and entry["venue"] == "ICLR 2020"
    assert entry["additional_data"] is False and entry["reported"] == "47.18"
    assert entry["architecture"] == "WideResNet-28-4" and entry["name"] == "zoo"
    assert entry["authors"] is None and entry["footnote"] is None and "external" not in entry
    assert entry["number_forward_passes"] == 1  # the probes found it deterministic
    assert entry["unreliable"] is (not entry["reliable"])
    assert (entry["dataset"], entry["eps"], entry["threat_model"]) == ("cifar10", "8/255",
                                                                      "Linf")
    assert (entry["n"], entry["attack"], entry["version"]) == (2, "autoattack", "standard")
    [rec] = [json.loads(line) for line in (cache / "runs/zoo/metrics.jsonl").read_text()
             .splitlines() if json.loads(line)["kind"] == "attack"]
    assert rec["params"]["eps"] == pytest.approx(8 / 255) and rec["params"]["norm"] == "linf"
    assert rec["params"]["steps"] == 1 and rec["n"] == 2
    assert entry["clean_acc"] == f"{100 * rec['clean_accuracy']:.2f}"


@pytest.mark.parametrize(("argv", "expected"), [
    (["--param", "eps=0.1"], "--param: 'eps=0.1' is set by the protocol"),
    (["--threat-model", "L1"], "--threat-model: 'L1' is not one of Linf, L2"),
    (["--card", "venue"], "--card: 'venue' is not KEY=VALUE"),
    (["--card", "additional_data=maybe"], "--card: additional_data: 'maybe' is not true or"),
    (["--card", "number_forward_passes=0"], "--card: number_forward_passes: '0' is not a"),
])
def test_bad_protocol_options_are_one_line(pagctl: Any, cache: Path, argv: list[str],
                                           expected: str) -> None:
    assert pagctl("import", "--model", f"robustbench:{ZOO_NAME}", "--dataset", "cifar10",
                  "--data-dir", "data", "--out", "runs/zoo").code == 0
    got = pagctl("benchmark", "runs/zoo", *argv, "--n", "1", "--data-dir", "data")
    assert got.code == 2 and len(got.stderr.strip().splitlines()) == 1, got.stderr
    assert expected in got.stderr
    assert not (cache / "benchmark").exists()


def test_a_randomised_model_has_no_forward_count_unless_given() -> None:
    """``number_forward_passes``: 1 for a deterministic model; null for a randomised one
    (probes' spread above tolerance, or AutoAttack 'rand'), unless the card gives it."""
    from types import SimpleNamespace

    from pagctl.robustness.exports import forward_passes, robustbench_entry

    def report(spread: float, version: str = "standard") -> Any:
        return SimpleNamespace(
            reliability={"reliable": False, "probes": {"output_spread": spread}},
            reliable=False, params={"version": version}, attack="autoattack", norm="linf",
            eps=8 / 255, clean_accuracy=0.5, robust_accuracy=0.25, n=4)

    assert forward_passes(report(0.0)) == 1
    assert forward_passes(report(0.3)) is None
    assert forward_passes(report(0.0, "rand")) is None
    entry = robustbench_entry(report(0.3), name="r", dataset="cifar10", architecture="a",
                              card={"number_forward_passes": 20, "external": "20.00"})
    assert entry["number_forward_passes"] == 20 and entry["external"] == "20.00"
    assert entry["unreliable"] is True and entry["autoattack_acc"] == "25.00"
