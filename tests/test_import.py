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
from tied_model import TIED_MODULE
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


def boom(num_classes: int) -> nn.Module:
    raise RuntimeError("boom")


def needs(num_classes: int, width: int) -> nn.Module:
    return Plain(num_classes)
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
    from pagctl.evaluation.request import EvaluationRequest
    from pagctl.robustness.evaluate import AttackJob, evaluate_attack
    from pagctl.spec import load_spec

    net, weights = plain
    got = pagctl("import", "--model", "plain_digits:make", "--dataset", "digits",
                 "--checkpoint", weights, "--out", "runs/plain", "--format", "json")
    assert got.code == 0, got.stderr
    [record] = envelope_records(got.stdout, "import")
    assert record["normalisation"] == \
        "none: the factory's model takes [0, 1] pixels (mean 0, std 1)"
    assert record["mean"] == [0.0] and record["std"] == [1.0]
    assert record["format"] == "safetensors" and record["n_check"] == 256
    refused = pagctl("attack", "runs/plain", "--limit", "4", "--no-probes")
    assert refused.code == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "'plain_digits:make' names Python code" in refused.stderr
    assert "--trust-code" in refused.stderr
    via_cli = _attack(pagctl, Path("runs/plain"), "--trust-code")
    assert via_cli["clean_accuracy"] > 0.8 and 0 < via_cli["robust_correct"] < 40

    bundle = load_data(load_spec("digits-vanilla", []).data)
    params = registry.attacks.validate_params("pgd_l2", {"steps": 5, "eps": 0.5}, "p")
    reports, _ = evaluate_attack(net.eval(), bundle, AttackJob("pgd_l2", params, probes=False),
                                 EvaluationRequest(limit=40))
    assert via_cli["per_example"]["robust"] == reports[0].per_example["robust"]
    assert via_cli["per_example"]["clean"] == reports[0].per_example["clean"]
    # the folder is a run folder: its records, its weights, compare
    kinds = [r.kind for r in read_metrics(Path("runs/plain")).records]
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
    # half a normalisation is refused, not completed from a default nobody chose
    (["--model", "plain_digits:make", "--dataset", "digits", "--set", "model.mean=[0.5]"],
     "model.std: model.mean is given but model.std is not; give both"),
    (["--model", "plain_digits:make", "--dataset", "digits", "--set", "model.std=[0.5]"],
     "model.mean: model.std is given but model.mean is not; give both"),
    # the factory's own failure is the factory's; a keyword it does not take is the kwarg's
    (["--model", "plain_digits:boom", "--dataset", "digits"],
     "model.arch: plain_digits:boom raised RuntimeError: boom;"),
    (["--model", "plain_digits:make", "--dataset", "digits", "--set", "model.kwargs.depth=3"],
     "model.kwargs.depth: not an argument of plain_digits:make"),
    (["--model", "plain_digits:needs", "--dataset", "digits"],
     "model.kwargs.width: plain_digits:needs needs it"),
    # import has --download, which the refusal of pretrained weights names
    (["--model", "test_resnet", "--dataset", "digits", "--set", "model.kwargs.pretrained=true"],
     "pass --download to allow it"),
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
    assert "--resume" not in again.stderr and "another --out" in again.stderr
    assert pagctl(*argv, "--overwrite").code == 0
    assert [r.kind for r in read_metrics(Path("runs/plain")).records] == ["import"]
    # a trained run's folder (it has a saved state): import has no --resume to suggest
    Path("runs/trained").mkdir()
    Path("runs/trained/state.safetensors").write_bytes(b"")
    onto = pagctl(*argv[:-1], "runs/trained")
    assert onto.code == 2 and len(onto.stderr.strip().splitlines()) == 1
    assert "--resume" not in onto.stderr
    assert "pass --overwrite to replace it, or choose another --out" in onto.stderr


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
    assert record["normalisation"] == "the dataset's default (digits) (mean 0.3054, std 0.3761)"
    given = pagctl("import", "--model", "test_resnet", "--dataset", "digits", "--checkpoint",
                   "r.safetensors", "--mean", "0.5", "--std", "0.25", "--out", "runs/r2",
                   "--format", "json")
    assert given.code == 0, given.stderr
    [record] = envelope_records(given.stdout, "import")
    assert record["mean"] == [0.5] and record["normalisation"] == "given (mean 0.5, std 0.25)"
    assert record["normalisation_check"] is None  # given, not guessed: nothing to compare
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


# ---------------------------------------------------------------------------------------
# tied weights, dtypes, broken weights, pickle refusals




def _module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, text: str) -> Any:
    """``text`` written as ``name``.py in the working folder (``tmp_path``), imported anew."""
    import importlib
    import sys

    monkeypatch.chdir(tmp_path)
    (tmp_path / f"{name}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)
    return importlib.import_module(name)


def test_a_tied_model_imports_stays_tied_and_its_folder_attacks(
        pagctl: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """safetensors refuses tensors that share memory: the tied weight is stored once, the
    folder loads tied, and a checkpoint that holds one of the tied names (safetensors'
    own save_model) fits. Names that disagree with the tie are refused."""
    from safetensors import safe_open
    from safetensors.torch import save_model

    module = _module(tmp_path, monkeypatch, "tiedmod", TIED_MODULE)
    torch.manual_seed(1)
    net = module.make(10)
    x, y = _digits_train()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()  # type: ignore[no-untyped-call]
        opt.step()
    save_model(net, "tied.safetensors")  # keeps one of the two tied names
    assert len({"encoder.weight", "decoder.weight"} & set(load_file("tied.safetensors"))) == 1
    got = pagctl("import", "--model", "tiedmod:make", "--dataset", "digits", "--checkpoint",
                 "tied.safetensors", "--out", "runs/tied", "--format", "json")
    assert got.code == 0, got.stderr
    with safe_open("runs/tied/model.safetensors", framework="pt") as fh:
        assert json.loads(fh.metadata()["pagctl_aliases"]) == {
            "decoder.weight": "encoder.weight"}
    loaded = load_run(Path("runs/tied"), trust=CodeTrust.of(True))
    rebuilt: Any = loaded.model.net
    assert rebuilt.decoder.weight is rebuilt.encoder.weight  # still one parameter
    for key, value in net.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    attacked = _attack(pagctl, Path("runs/tied"), "--trust-code")
    assert attacked["clean_accuracy"] > 0.5
    # a checkpoint whose two names for the one parameter differ cannot be loaded as it is
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["decoder.weight"] += 1
    save_file(state, "untied.safetensors")
    bad = pagctl("import", "--model", "tiedmod:make", "--dataset", "digits", "--checkpoint",
                 "untied.safetensors", "--out", "runs/untied")
    assert bad.code == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "'decoder.weight' differ, but the architecture ties them" in bad.stderr
    assert not Path("runs/untied").exists()


def test_a_tensor_of_another_dtype_kind_is_refused_a_half_one_is_cast(
        pagctl: Any, plain: tuple[nn.Module, Path]) -> None:
    net, _ = plain
    state = dict(net.state_dict())
    save_file({k: v.half() for k, v in state.items()}, "half.safetensors")
    half = pagctl("import", "--model", "plain_digits:make", "--dataset", "digits",
                  "--checkpoint", "half.safetensors", "--out", "runs/half")
    assert half.code == 0, half.stderr  # float16 -> float32: a cast within one kind
    for key, kind, word in (("body.1.weight", torch.int64, "integer"),
                            ("body.3.bias", torch.bool, "boolean"),
                            ("body.3.weight", torch.complex64, "complex")):
        save_file({**state, key: state[key].to(kind)}, "kind.safetensors")
        got = pagctl("import", "--model", "plain_digits:make", "--dataset", "digits",
                     "--checkpoint", "kind.safetensors", "--out", "runs/kind")
        assert got.code == 2 and len(got.stderr.strip().splitlines()) == 1, got.stderr
        assert f"'{key}' is {kind} but the architecture's parameter is torch.float32" \
            in got.stderr
        assert f"would turn {word} values into floating-point ones" in got.stderr
        assert "convert that tensor in the checkpoint" in got.stderr
        assert not Path("runs/kind").exists()


def test_broken_weights_are_blamed_on_the_checkpoint_not_on_training(
        pagctl: Any, plain: tuple[nn.Module, Path]) -> None:
    net, _ = plain
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["body.1.weight"][0, 0] = float("nan")
    save_file(state, "nan.safetensors")
    got = pagctl("import", "--model", "plain_digits:make", "--dataset", "digits",
                 "--checkpoint", "nan.safetensors", "--out", "runs/nan")
    assert got.code == 2 and len(got.stderr.strip().splitlines()) == 1, got.stderr
    assert "its weights are broken (NaN/inf in 'body.1.weight'): check the checkpoint " \
        "nan.safetensors" in got.stderr
    assert "train.lr" not in got.stderr and not Path("runs/nan").exists()


def test_the_pickle_refusal_is_one_complete_line(
        pagctl: Any, plain: tuple[nn.Module, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.load's refusal is long, multi-line and coloured: the line quotes the sentence
    naming the class it refused, cut at a word if need be, and always ends with the fix."""
    from pagctl.errors import CheckpointError

    net, _ = plain
    torch.save({"model": net}, "whole.pt")
    got = pagctl("import", "--model", "plain_digits:make", "--dataset", "digits",
                 "--checkpoint", "whole.pt", "--trust-pickle", "--out", "runs/w")
    assert got.code == 2 and len(got.stderr.strip().splitlines()) == 1, got.stderr
    line = got.stderr.strip()
    assert "Unsupported global: GLOBAL plain_digits.Plain was not an allowed global" in line
    assert "\x1b" not in line and "add_safe_globals" not in line
    assert line.endswith("(torch.save(model.state_dict(), f)) or as safetensors")

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ValueError("the archive " + "is damaged beyond repair " * 20)

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(CheckpointError) as info:
        read_weights(Path("whole.pt"), trust_pickle=True)
    message = str(info.value)
    detail = message.split("(ValueError: ", 1)[1].split(")", 1)[0]
    assert detail.endswith("…") and len(detail) <= 160, detail
    assert detail[:-1].split()[-1] in {"is", "damaged", "beyond", "repair"}  # whole words
    assert message.endswith("or as safetensors") and "\n" not in message


def test_download_is_an_import_option(pagctl: Any, plain: tuple[nn.Module, Path]) -> None:
    """pagctl import takes --download as pagctl train does (data.download), so the refusal
    of pretrained weights without it names an option the command has."""
    got = pagctl("import", "--model", "plain_digits:make", "--dataset", "digits",
                 "--checkpoint", plain[1], "--download", "--out", "runs/d")
    assert got.code == 0, got.stderr
    assert json.loads(Path("runs/d/spec.json").read_text())["data"]["download"] is True


# ---------------------------------------------------------------------------------------
# the check: the normalisation guessed, and a check near chance


THRESHOLD_MODULE = '''
import torch
from torch import nn


class Thresholded(nn.Module):
    """A linear classifier on the pixels above 1.0: calibrated for normalised inputs
    (digits' mean 0.3054, std 0.3761: ink above 0.68), blind to [0, 1] pixels."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(x.flatten(1) - 1.0))


def make(num_classes: int) -> nn.Module:
    return Thresholded(num_classes)


def constant(num_classes: int) -> nn.Module:
    head = nn.Linear(64, num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return nn.Sequential(nn.Flatten(), head)
'''


def test_a_better_normalisation_is_warned_about_by_the_cli_and_the_api(
        pagctl: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A factory's model trained on normalised digits, imported without --mean/--std, gets
    none (its default) and scores near chance: the check scores the dataset's default too,
    and warns with the options that apply it. Given the right ones, it does not."""
    import pagctl.api as pg
    from pagctl.data import load_data
    from pagctl.spec import load_spec

    module = _module(tmp_path, monkeypatch, "thresh", THRESHOLD_MODULE)
    bundle = load_data(load_spec("digits-vanilla", []).data)
    (mean,), (std,) = bundle.mean, bundle.std
    torch.manual_seed(0)
    net = module.make(10)
    x, y = _digits_train()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(net((x - mean) / std), y).backward()  # type: ignore[no-untyped-call]
        opt.step()
    save_file(net.state_dict(), "t.safetensors")
    argv = ["import", "--model", "thresh:make", "--dataset", "digits", "--checkpoint",
            "t.safetensors", "--format", "json"]
    got = pagctl(*argv, "--out", "runs/t")
    assert got.code == 0, got.stderr
    [record] = envelope_records(got.stdout, "import")
    used, other = record["normalisation_check"]
    assert (used["source"], used["used"], other["source"], other["used"]) == (
        "none", True, "dataset", False)
    assert used["accuracy"] == record["check_accuracy"] < 0.2 < 0.8 < other["accuracy"]
    [warning] = got.stderr.strip().splitlines()
    assert warning.startswith(
        f"warning: the import check scores {used['accuracy']:.3f} with the normalisation "
        "used (none: the factory's model takes [0, 1] pixels) but "
        f"{other['accuracy']:.3f} with the dataset's default (digits)")
    assert warning.endswith(f"import it again with --mean {mean:.6g} --std {std:.6g}")
    # the options it names remove the warning
    right = pagctl(*argv, "--mean", f"{mean:.6g}", "--std", f"{std:.6g}", "--out", "runs/r")
    assert right.code == 0 and right.stderr == "", right.stderr
    [record] = envelope_records(right.stdout, "import")
    assert record["check_accuracy"] == other["accuracy"]
    # the API returns the same warning
    result = pg.import_model("runs/api", "thresh:make", "digits", checkpoint="t.safetensors")
    assert result.warnings == [warning]


def test_a_check_near_chance_is_warned_about(
        pagctl: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pagctl.importing import clearly_better, near_chance

    _module(tmp_path, monkeypatch, "thresh", THRESHOLD_MODULE)
    got = pagctl("import", "--model", "thresh:constant", "--dataset", "digits", "--out",
                 "runs/c")
    assert got.code == 0, got.stderr
    assert "near chance (1/10): check --model, --checkpoint and the normalisation" in \
        got.stderr
    assert near_chance(0.15, 10) and not near_chance(0.16, 10)
    assert near_chance(0.6, 2) and not near_chance(0.61, 2)  # 0.1 above chance at most
    # the rule: 0.1 higher, on enough disagreeing points (exact sign test, p < 0.01)
    worse = torch.zeros(256, dtype=torch.bool)
    assert clearly_better(torch.arange(256) < 26, worse)  # 26 wins of 26: 0.102 higher
    assert not clearly_better(torch.arange(256) < 25, worse)  # 0.098: too small a gain
    assert not clearly_better(torch.arange(4) < 4, worse[:4])  # 4 points: too few to tell


def test_compare_shows_an_imported_runs_training_fields_as_unknown(
        pagctl: Any, plain: tuple[nn.Module, Path]) -> None:
    """An imported run's spec holds training defaults (epochs, lr, ...) for a model pagctl
    did not train: compare shows its origin and those fields as ``imported``, never the
    defaults, and they are columns only where trained runs differ in them."""
    from pagctl.checkpoint import read_spec
    from pagctl.spec import load_spec
    from pagctl.train import train

    _, weights = plain
    got = pagctl("import", "--model", "plain_digits:make", "--dataset", "digits",
                 "--checkpoint", weights, "--out", "runs/plain")
    assert got.code == 0, got.stderr
    default_epochs = read_spec(Path("runs/plain")).train.epochs
    fast = ["eval.attack=null", "eval.align_source=null", "eval.limit=40",
            "data.batch_size=256"]
    for epochs in (1, 2):
        assert default_epochs != epochs
        train(load_spec("digits-vanilla", [*fast, f"train.epochs={epochs}",
                                           f"out_dir=runs/t{epochs}"]), progress=False)

    def comparison(*runs: str) -> dict[str, Any]:
        out = pagctl("compare", *runs, "--format", "json")
        assert out.code == 0, out.stderr
        [record] = envelope_records(out.stdout, "compare")
        return record

    two = comparison("runs/plain", "runs/t1")
    ids = [c["id"] for c in two["columns"] if c["kind"] == "spec"]
    assert "origin" in ids and "model.arch" in ids
    assert not [i for i in ids if i.startswith(("train.", "eval.", "target_gradients."))]
    assert [r["spec"]["origin"] for r in two["runs"]] == ["imported", "trained"]

    three = comparison("runs/plain", "runs/t1", "runs/t2")
    assert [r["spec"]["train.epochs"] for r in three["runs"]] == ["imported", 1, 2]
    table = pagctl("compare", "runs/plain", "runs/t1", "runs/t2", "--format", "markdown")
    assert table.code == 0, table.stderr
    [imported_row] = [line for line in table.stdout.splitlines() if "| plain" in line]
    assert "| imported |" in imported_row and f"| {default_epochs} |" not in imported_row
