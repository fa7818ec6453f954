"""``pagctl import``: models pagctl did not train become run folders that every command
reads, with the same per-example results as attacking the module directly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import envelope_records
from safetensors.torch import load_file, save_file
from torch import nn

from pagctl.checkpoint import load_run, read_metrics
from pagctl.importing import read_weights
from pagctl.trust import CodeTrust

PLAIN_MODULE = '''
import torch
from torch import nn


class Plain(nn.Module):
    """A plain-torch digits classifier taking [0, 1] pixels: not timm, not pagctl's."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(),
                                  nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def make(num_classes: int) -> nn.Module:
    return Plain(num_classes)


def three_classes() -> nn.Module:
    return Plain(3)
'''


@pytest.fixture
def plain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[nn.Module, Path]:
    """The module written to the working folder as ``plain_digits.py``, one instance of it
    with seeded weights, and those weights as safetensors."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plain_digits.py").write_text(PLAIN_MODULE)
    import importlib
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        sys.modules.pop("plain_digits", None)
        module = importlib.import_module("plain_digits")
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(3)
    net = module.make(10)
    x, y = _digits_train()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(60):  # accurate enough that attacks have points to break
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()  # type: ignore[no-untyped-call]
        opt.step()
    save_file(net.state_dict(), str(tmp_path / "plain.safetensors"))
    return net, tmp_path / "plain.safetensors"


def _digits_train() -> tuple[torch.Tensor, torch.Tensor]:
    from pagctl.data import get_batch, load_data
    from pagctl.spec import load_spec

    train = load_data(load_spec("digits-vanilla", []).data).train
    return get_batch(train, torch.arange(len(train)))  # type: ignore[arg-type]


def _attack(pagctl: Any, run_dir: Path, *extra: str) -> dict[str, Any]:
    got = pagctl("attack", run_dir, "--attack", "pgd_l2", "--param", "steps=5", "--param",
                 "eps=0.5", "--limit", "40", "--no-probes", "--no-progress", "--format", "json",
                 *extra)
    assert got.code == 0, got.stderr
    [record] = envelope_records(got.stdout, "attack")
    return record


def test_an_imported_module_gives_the_per_example_results_of_the_module_itself(
        pagctl: Any, plain: tuple[nn.Module, Path]) -> None:
    """``pagctl import --model plain_digits:make`` then ``attack`` equals the engine run on the
    module as it is (same seed, same points), bit for bit per example. The folder names code,
    so whoever reads it must trust it (``--trust-code``)."""
    from pagctl import registry
    from pagctl.data import load_data
    from pagctl.robustness.evaluate import evaluate_attack
    from pagctl.spec import load_spec

    net, weights = plain
    got = pagctl("import", "--model", "plain_digits:make", "--dataset", "digits",
                 "--checkpoint", weights, "--out", "runs/plain", "--format", "json")
    assert got.code == 0, got.stderr
    [record] = envelope_records(got.stdout, "import")
    assert record["normalisation"].startswith("none") and record["mean"] == [0.0]
    assert record["format"] == "safetensors" and record["n_check"] == 256
    refused = pagctl("attack", "runs/plain", "--limit", "4", "--no-probes")
    assert refused.code == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "'plain_digits:make' names Python code" in refused.stderr
    assert "--trust-code" in refused.stderr
    via_cli = _attack(pagctl, Path("runs/plain"), "--trust-code")
    assert via_cli["clean_accuracy"] > 0.8 and 0 < via_cli["robust_correct"] < 40

    bundle = load_data(load_spec("digits-vanilla", []).data)
    params = registry.attacks.validate_params("pgd_l2", {"steps": 5, "eps": 0.5}, "p")
    reports, _ = evaluate_attack(net.eval(), bundle, "pgd_l2", params, limit=40, probes=False)
    assert via_cli["per_example"]["robust"] == reports[0].per_example["robust"]
    assert via_cli["per_example"]["clean"] == reports[0].per_example["clean"]
    # the folder is a run folder: its records, its weights, compare
    kinds = [r["kind"] for r in read_metrics(Path("runs/plain"))]
    assert kinds == ["import", "attack"]
    loaded = load_run(Path("runs/plain"), trust=CodeTrust.of(True))
    assert torch.equal(loaded.model.net.body[1].weight, net.body[1].weight)  # type: ignore[index,union-attr]
    table = pagctl("compare", "runs/plain", "--format", "markdown")
    assert table.code == 0 and "robust pgd_l2 l2 eps=0.5" in table.stdout


def test_a_pickle_needs_the_opt_in_and_reads_containers_and_prefixes(
        pagctl: Any, plain: tuple[nn.Module, Path]) -> None:
    net, weights = plain
    wrapped = {"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()},
               "epoch": 7}
    torch.save(wrapped, "plain.pt")
    refused = pagctl("import", "--model", "plain_digits:make", "--dataset", "digits",
                     "--checkpoint", "plain.pt", "--out", "runs/p")
    assert refused.code == 2 and "--trust-pickle" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not Path("runs/p").exists()
    got = pagctl("import", "--model", "plain_digits:make", "--dataset", "digits",
                 "--checkpoint", "plain.pt", "--trust-pickle", "--out", "runs/p",
                 "--format", "json")
    assert got.code == 0, got.stderr
    [record] = envelope_records(got.stdout, "import")
    assert (record["format"], record["container"], record["stripped_prefix"]) == (
        "pickle", "state_dict", "module.")
    saved = load_file("runs/p/model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())
    # a pickle holding code-bearing objects is refused even with the opt-in
    torch.save({"model": net}, "whole.pt")
    bad = pagctl("import", "--model", "plain_digits:make", "--dataset", "digits",
                 "--checkpoint", "whole.pt", "--trust-pickle", "--out", "runs/w")
    assert bad.code == 2 and "weights_only=True" in bad.stderr and not Path("runs/w").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "plain_digits:make"], "give --model and --dataset"),
    (["--model", "plain_digits:make", "--dataset", "digits", "--checkpoint", "missing.st"],
     "missing.st: no such file"),
    (["--model", "plain_digits:three_classes", "--dataset", "digits"],
     "expected (256, 10): one logit per class"),
    (["--model", "pagctl_small_cnn", "--dataset", "digits", "--checkpoint", "plain.safetensors"],
     "does not fit the architecture"),
    (["--model", "plain_digits:make", "--dataset", "digits", "--mean", "0.5"],
     "--std: give --mean and --std together"),
    (["--model", "plain_digits:make", "--dataset", "digits", "--mean", "a", "--std", "1"],
     "--mean: 'a' is not a comma-separated list"),
    (["--model", "plain_digits:nope", "--dataset", "digits"], "'plain_digits' has no 'nope'"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(
        pagctl: Any, plain: tuple[nn.Module, Path], argv: list[str], message: str) -> None:
    got = pagctl("import", *argv, "--out", "runs/x")
    assert got.code == 2, got.stderr
    assert message in got.stderr and len(got.stderr.strip().splitlines()) == 1
    assert not Path("runs/x").exists()


def test_an_existing_folder_is_refused_unless_overwritten(
        pagctl: Any, plain: tuple[nn.Module, Path]) -> None:
    argv = ["import", "--model", "plain_digits:make", "--dataset", "digits", "--checkpoint",
            plain[1], "--out", "runs/plain"]
    assert pagctl(*argv).code == 0
    again = pagctl(*argv)
    assert again.code == 2 and "--overwrite" in again.stderr
    assert pagctl(*argv, "--overwrite").code == 0
    assert [r["kind"] for r in read_metrics(Path("runs/plain"))] == ["import"]


def test_a_timm_model_with_a_checkpoint(pagctl: Any, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A timm architecture and its weights: the normalisation is the dataset's when timm's
    pretrained configuration has another channel count, or the one given."""
    import timm

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    save_file(net.state_dict(), "r.safetensors")
    got = pagctl("import", "--model", "test_resnet", "--dataset", "digits", "--checkpoint",
                 "r.safetensors", "--out", "runs/r", "--format", "json")
    assert got.code == 0, got.stderr
    [record] = envelope_records(got.stdout, "import")
    assert record["normalisation"] == "the dataset's default (digits)"
    given = pagctl("import", "--model", "test_resnet", "--dataset", "digits", "--checkpoint",
                   "r.safetensors", "--mean", "0.5", "--std", "0.25", "--out", "runs/r2",
                   "--format", "json")
    assert given.code == 0, given.stderr
    [record] = envelope_records(given.stdout, "import")
    assert record["mean"] == [0.5]
    loaded = load_run(Path("runs/r2"))
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(loaded.model(x), net.eval()((x - 0.5) / 0.25), atol=1e-6)


def test_read_weights_refuses_a_file_without_a_state_dict(tmp_path: Path) -> None:
    from pagctl.errors import CheckpointError

    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        read_weights(tmp_path / "c.pt", trust_pickle=True)


def test_a_timm_model_on_an_evaluation_folder_of_mixed_sizes(
        pagctl: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An image folder with only test/ and images of several sizes: the import takes the
    resize and the normalisation from timm's pretrained configuration, and attack runs."""
    import numpy as np
    import timm
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for cls, shapes in (("cat", [(50, 70), (90, 40)]), ("dog", [(64, 64), (120, 80)])):
        for i, (h, w) in enumerate(shapes):
            path = tmp_path / "data" / "val" / cls / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(path)
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", num_classes=2)
    save_file(net.state_dict(), "r.safetensors")
    got = pagctl("import", "--model", "test_resnet", "--dataset", "imagefolder", "--data-dir",
                 "data", "--checkpoint", "r.safetensors", "--out", "runs/r", "--format", "json")
    assert got.code == 0, got.stderr
    [record] = envelope_records(got.stdout, "import")
    assert record["resize"].startswith("160x160, crop 0.95, bilinear (timm's")
    assert record["normalisation"].startswith("timm's pretrained") and record["mean"] == [
        0.5, 0.5, 0.5]
    spec = json.loads(Path("runs/r/spec.json").read_text())
    assert (spec["data"]["image_size"], spec["data"]["crop_pct"]) == (160, 0.95)
    attacked = pagctl("attack", "runs/r", "--attack", "fgsm", "--param", "eps=4/255",
                      "--no-probes", "--no-progress", "--format", "json")
    assert attacked.code == 0, attacked.stderr
    assert [r["n"] for r in envelope_records(attacked.stdout, "attack")] == [4]
