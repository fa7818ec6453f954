"""`pagctl.api`: the documented example runs as it is, and the API's attack on a module
gives the per-example results of the command on the same model brought in by import."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import envelope_records
from safetensors.torch import save_file
from torch import nn

import pagctl.api as pg
from pagctl import cli
from pagctl.errors import PagctlError, SpecError

DOC = Path(__file__).resolve().parent.parent / "docs" / "python-api.md"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PAGCTL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def test_the_documented_example_runs(workdir: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert blocks, "docs/python-api.md has no python example"
    namespace: dict[str, Any] = {"__name__": "example"}
    exec(compile("\n".join(blocks), str(DOC), "exec"), namespace)  # noqa: S102
    assert (workdir / "runs" / "v" / "model.safetensors").is_file()


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return out


def test_api_attack_on_a_module_equals_the_command_on_its_import(
        workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "linear_digits.py").write_text(
        "from torch import nn\n\n\ndef make(num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n")
    torch.manual_seed(1)
    module = _Linear()
    digits = pg.dataset("digits")
    x, y = (torch.stack([digits.train[i][0] for i in range(500)]),
            torch.tensor([digits.train[i][1] for i in range(500)]))
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(module(x), y).backward()  # type: ignore[no-untyped-call]
        opt.step()
    save_file({k: v.contiguous() for k, v in module.body.state_dict().items()},
              str(workdir / "lin.safetensors"))
    via_api = pg.attack(module, digits, attack="pgd_linf", eps=0.1, params={"steps": 5},
                        limit=80, probes=False)
    assert not isinstance(via_api, list) and via_api.clean_accuracy > 0.7

    pg.import_model("runs/lin", "linear_digits:make", "digits",
                    checkpoint=workdir / "lin.safetensors")
    capsys.readouterr()
    try:
        cli.main(["attack", "runs/lin", "--attack", "pgd_linf", "--param", "eps=0.1",
                  "--param", "steps=5", "--limit", "80", "--no-probes", "--no-progress",
                  "--format", "json", "--trust-code"])
    except SystemExit as exc:
        assert not exc.code
    [via_cli] = envelope_records(capsys.readouterr().out, "attack")
    assert via_cli["per_example"] == via_api.per_example
    via_folder = pg.attack("runs/lin", attack="pgd_linf", eps=0.1, params={"steps": 5},
                           limit=80, probes=False, trust_code=True)
    assert not isinstance(via_folder, list)
    assert via_folder.per_example == via_api.per_example
    # the same evaluation in 3 shards (run folder: RUN/shards), merged
    common: dict[str, Any] = {"attack": "pgd_linf", "eps": 0.1, "params": {"steps": 5},
                              "limit": 80, "batch_size": 16, "probes": False,
                              "trust_code": True}
    whole = pg.attack("runs/lin", **common)
    for i in range(3):
        pg.attack("runs/lin", shard=(i, 3), **common)
    merged = pg.attack("runs/lin", merge_shards=3, **common)
    assert not isinstance(merged, list) and not isinstance(whole, list)
    assert merged.per_example == whole.per_example
    # a module has no run folder: its shards go where shard_dir says
    with pytest.raises(SpecError, match="shard_dir"):
        pg.attack(module, digits, shard=(0, 2), **common)
    for i in range(2):
        pg.attack(module, digits, shard=(i, 2), shard_dir=workdir / "mine", **common)
    again = pg.attack(module, digits, merge_shards=2, shard_dir=workdir / "mine", **common)
    assert not isinstance(again, list) and again.per_example == whole.per_example
    # align-score likewise: 2 shards of a module's score, merged, equal the whole score
    scored: dict[str, Any] = {"source": "class_mean", "classes_per_image": 3, "limit": 60,
                              "batch_size": 16}
    whole_score = pg.align_score(module, digits, **scored)
    for i in range(2):
        assert pg.align_score(module, digits, shard=(i, 2), shard_dir=workdir / "aligned",
                              **scored) is None
    merged_score = pg.align_score(module, digits, merge_shards=2,
                                  shard_dir=workdir / "aligned", **scored)
    assert merged_score is not None and whole_score is not None
    assert merged_score.mean == whole_score.mean
    assert merged_score.per_true_class == whole_score.per_true_class
    with pytest.raises(SpecError, match="shard_dir"):
        pg.align_score(module, digits, shard=(0, 2), **scored)


def test_api_errors_are_one_line(workdir: Path) -> None:
    module = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(SpecError, match="a module has no test set"):
        pg.attack(module, attack="fgsm")
    with pytest.raises(SpecError, match=r"params\.norm"):
        pg.attack(module, (torch.rand(4, 1, 8, 8), torch.arange(4)), attack="fgsm", norm="L3")
    with pytest.raises(PagctlError, match=r"outside \[0, 1\]"):
        pg.tensors(torch.randn(4, 1, 8, 8) * 5, torch.arange(4))
    with pytest.raises(SpecError, match="mean and std together"):
        pg.wrap(module, mean=[0.5])


def _digits_xy(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    digits = pg.dataset("digits")
    x = torch.stack([digits.test[i][0] for i in range(n)])
    y = torch.tensor([digits.test[i][1] for i in range(n)])
    return x, y


def _digits() -> Any:
    return pg.dataset("digits")


def _ten() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def _three() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))


# Each: what the API is called with, and the words of its one-line refusal. A FieldError
# names the parameter (the command line says the flag, test_cli's cases check those).
BAD_CALLS: list[tuple[str, Any, str]] = [
    ("3-logits-for-10-classes", lambda xy: pg.attack(_three(), xy, "fgsm", eps=0.1),
     "model: gives outputs (2, 3) for 2 image(s) of tensors; expected (2, 10)"),
    ("3-logits-align", lambda xy: pg.align_score(_three(), _digits(), "class_mean",
                                                 classes_per_image=2),
     "model: gives outputs (2, 3) for 2 image(s) of digits; expected (2, 10)"),
    ("wrong-input-shape", lambda xy: pg.attack(
        nn.Sequential(nn.Flatten(), nn.Linear(12, 10)), xy, "fgsm", eps=0.1),
     "model: fails on 2 image(s) of tensors shaped (1, 8, 8)"),
    ("limit-minus-one", lambda xy: pg.attack(_ten(), xy, "fgsm", eps=0.1, limit=-1),
     "limit: -1 is not at least 1"),
    ("limit-zero", lambda xy: pg.attack(_ten(), xy, "fgsm", eps=0.1, limit=0),
     "limit: 0 is not at least 1"),
    ("limit-float", lambda xy: pg.attack(_ten(), xy, "fgsm", eps=0.1, limit=2.5),
     "limit: expected a whole number, got 2.5"),
    ("align-limit-zero", lambda xy: pg.align_score(_ten(), _digits(), "class_mean", limit=0),
     "limit: 0 is not at least 1"),
    ("batch-size-zero", lambda xy: pg.attack(_ten(), xy, "fgsm", eps=0.1, batch_size=0),
     "batch_size: 0 is not at least 1"),
    ("align-batch-size-zero", lambda xy: pg.align_score(_ten(), _digits(), batch_size=0),
     "batch_size: 0 is not at least 1"),
    ("seed-negative", lambda xy: pg.attack(_ten(), xy, "fgsm", eps=0.1, seed=-1),
     "seed: -1 is not between 0 and 4294967295"),
    ("probe-size-zero", lambda xy: pg.attack(_ten(), xy, "fgsm", eps=0.1, probe_size=0),
     "probe_size: 0 is not at least 1"),
    ("indices-repeat", lambda xy: pg.attack(_ten(), xy, "fgsm", eps=0.1, indices=[1, 1]),
     "indices: index 1 appears twice"),
    ("indices-empty", lambda xy: pg.attack(_ten(), xy, "fgsm", eps=0.1, indices=[]),
     "indices: no index given"),
    ("indices-outside", lambda xy: pg.attack(_ten(), xy, "fgsm", eps=0.1, indices=[99]),
     "indices: index 99 is outside the test set (0..15)"),
    ("indices-text", lambda xy: pg.attack(_ten(), xy, "fgsm", eps=0.1, indices="1,2"),
     "indices: expected integers, got text"),
    ("indices-floats", lambda xy: pg.attack(_ten(), xy, "fgsm", eps=0.1, indices=[0.5]),
     "indices: expected integers, got float64 values"),
    ("indices-2d", lambda xy: pg.align_score(_ten(), _digits(), indices=[[0, 1]]),
     "indices: expected a flat list of integers"),
    ("sweep-negative", lambda xy: pg.attack(_ten(), xy, "fgsm", eps_sweep=[0.1, -1]),
     "eps_sweep: -1 is not a valid eps"),
    ("sweep-twice", lambda xy: pg.attack(_ten(), xy, "fgsm", eps_sweep=[0.1, "1/10"]),
     "eps_sweep: a budget appears twice"),
    ("sweep-text", lambda xy: pg.attack(_ten(), xy, "fgsm", eps_sweep="0.1,0.2"),
     "eps_sweep: expected a list of budgets"),
    ("sweep-empty", lambda xy: pg.attack(_ten(), xy, "fgsm", eps_sweep=[]),
     "eps_sweep: give at least one budget"),
    ("precision", lambda xy: pg.attack(_ten(), xy, "fgsm", eps=0.1, precision="fp16"),
     "precision: 'fp16' is not one of float32, bfloat16"),
    ("shard-beyond-batches", lambda xy: pg.attack(_ten(), xy, "fgsm", eps=0.1, batch_size=4,
                                                  shard=(1, 100000), shard_dir="s"),
     "shard: 100000 shards of 16 points in batches of 4 (4 batches)"),
    ("shard-backwards", lambda xy: pg.attack(_ten(), xy, "fgsm", eps=0.1, shard=(2, 1),
                                             shard_dir="s"),
     "shard: expected (i, N) with 0 <= i < N, got (2, 1)"),
    ("shard-not-a-pair", lambda xy: pg.align_score(_ten(), _digits(), shard=3, shard_dir="s"),
     "shard: expected (i, N)"),
    ("merge-beyond-batches", lambda xy: pg.attack(_ten(), xy, "fgsm", eps=0.1, batch_size=8,
                                                  merge_shards=3, shard_dir="s"),
     "merge_shards: 3 shards of 16 points in batches of 8 (2 batches)"),
    ("shard-and-merge", lambda xy: pg.attack(_ten(), xy, "fgsm", eps=0.1, shard=(0, 2),
                                             merge_shards=2, shard_dir="s"),
     "merge_shards: run one shard, or merge them all; not both"),
    ("classes-per-image", lambda xy: pg.align_score(_ten(), _digits(), classes_per_image=11),
     "classes_per_image: 11 target classes per image; the data has 10 classes"),
    ("classes-per-image-zero", lambda xy: pg.align_score(_ten(), _digits(),
                                                         classes_per_image=0),
     "classes_per_image: 0 target classes"),
    ("model-not-a-module", lambda xy: pg.attack("not/a/run", xy, "fgsm", eps=0.1),
     "not/a/run: no such run folder"),
    ("model-a-number", lambda xy: pg.attack(3, xy, "fgsm", eps=0.1),
     "model: expected a run folder, a loaded run or a torch.nn.Module, got int"),
    ("data-one-tensor", lambda xy: pg.attack(_ten(), xy[0], "fgsm", eps=0.1),
     "data: expected a DataBundle or (images, labels), got Tensor"),
    ("data-missing", lambda xy: pg.attack(_ten(), attack="fgsm", eps=0.1),
     "data: a module has no test set of its own"),
    ("unknown-attack", lambda xy: pg.attack(_ten(), xy, "fgsmm"), "fgsmm"),
    ("unknown-source", lambda xy: pg.align_score(_ten(), xy, "nearest_neighbour"),
     "nearest_neighbour"),
    ("device", lambda xy: pg.attack(_ten(), xy, "fgsm", eps=0.1, device="gpu"),
     "device: 'gpu' is not a device"),
    ("weights", lambda xy: pg.load("runs/none", weights="worst"),
     "runs/none: no such run folder"),
    ("dataset-typo", lambda xy: pg.dataset("digts"), "name: Input should be 'digits'"),
    ("dataset-unknown-field", lambda xy: pg.dataset("digits", split_sed=2),
     "split_sed: unknown key"),
    ("tensors-empty", lambda xy: pg.tensors(xy[0][:0], xy[1][:0]),
     "images: no image given"),
    ("tensors-list", lambda xy: pg.tensors(xy[0].tolist(), xy[1]),
     "images: expected a torch.Tensor or numpy array, got list"),
    ("tensors-3d", lambda xy: pg.tensors(xy[0][:, 0], xy[1]),
     "images: expected (N, C, H, W), got shape (16, 8, 8)"),
    ("tensors-int-images", lambda xy: pg.tensors(xy[0].long(), xy[1]),
     "images: expected float pixels in [0, 1] or uint8 0..255, got torch.int64"),
    ("tensors-float-labels", lambda xy: pg.tensors(xy[0], xy[1].float()),
     "labels: expected integer class labels, got torch.float32"),
    ("tensors-label-count", lambda xy: pg.tensors(xy[0], xy[1][:3]),
     "labels: expected (16,), one per image, got (3,)"),
    ("tensors-nan", lambda xy: pg.tensors(xy[0] * float("nan"), xy[1]),
     "non-finite pixel value"),
    ("tensors-labels-beyond", lambda xy: pg.tensors(xy[0], xy[1], num_classes=3),
     "label(s) outside [0, 3)"),
    ("tensors-num-classes", lambda xy: pg.tensors(xy[0], xy[1], num_classes=0),
     "num_classes: expected a whole number from 1 to 100000, got 0"),
    ("wrap-not-a-module", lambda xy: pg.wrap("net", mean=[0.5], std=[0.5]),
     "module: expected a torch.nn.Module, got str"),
    ("wrap-mean-alone", lambda xy: pg.wrap(_ten(), mean=[0.5]),
     "std: give mean and std together"),
    ("wrap-zero-std", lambda xy: pg.wrap(_ten(), mean=[0.5], std=[0.0]),
     "std: every std entry must be > 0"),
    ("record-not-a-report", lambda xy: pg.record("runs/none", "report"),
     "record: str is not a report"),
    ("record-no-run", lambda xy: pg.record(None, "report"),  # type: ignore[arg-type]
     "run: expected a run folder's path, got NoneType"),
    ("load-no-run", lambda xy: pg.load(None),  # type: ignore[arg-type]
     "run: expected a run folder's path, got NoneType"),
    ("device-number", lambda xy: pg.attack(_ten(), xy, "fgsm", eps=0.1, device=0),
     "device: expected text such as auto, cpu or cuda:0, got 0"),
    ("device-meta", lambda xy: pg.attack(_ten(), xy, "fgsm", eps=0.1, device="meta"),
     "device: 'meta' holds no values"),
    ("params-text", lambda xy: pg.attack(_ten(), xy, "fgsm", params="eps=0.1"),
     "params: expected a dict of parameter values, got str"),
    ("sweep-generator-ok-then-bad", lambda xy: pg.attack(
        _ten(), xy, "fgsm", eps_sweep=(e for e in [0.1, -2])), "eps_sweep: -2 is not a valid"),
    ("sweep-a-number", lambda xy: pg.attack(_ten(), xy, "fgsm", eps_sweep=0.1),
     "eps_sweep: expected a list of budgets, got float"),
    ("eps-overflow", lambda xy: pg.attack(_ten(), xy, "fgsm", eps="1e400"),
     "finite number"),
    ("eps-huge-fraction", lambda xy: pg.attack(_ten(), xy, "fgsm", eps="1" * 60 + "/3"),
     "expected a number or an exact fraction"),
    ("eps-bool", lambda xy: pg.attack(_ten(), xy, "fgsm", eps=True), "expected a number"),
    ("shard-dir-a-file", lambda xy: pg.attack(_ten(), xy, "fgsm", eps=0.1, shard=(0, 2),
                                              shard_dir=__file__),
     "shard_dir: " + __file__ + " is a file"),
    ("model-raises", lambda xy: pg.attack(_Raises(), xy, "fgsm", eps=0.1),
     "model: fails on 2 image(s) of tensors shaped (1, 8, 8): ZeroDivisionError"),
    ("indices-meta", lambda xy: pg.attack(_ten(), xy, "fgsm", eps=0.1,
                                          indices=torch.arange(3, device="meta")),
     "indices: a tensor on the meta device"),
    ("tensors-meta", lambda xy: pg.tensors(xy[0].to("meta"), xy[1]),
     "images: a tensor on the meta device"),
    ("tensors-many-classes", lambda xy: pg.tensors(xy[0], xy[1], num_classes=10**9),
     "num_classes: expected a whole number from 1 to 100000"),
    ("wrap-nan", lambda xy: pg.wrap(_ten(), mean=[0.5], std=[float("nan")]),
     "std: expected finite numbers"),
    ("import-a-module", lambda xy: pg.import_model("runs/m", _ten(), "digits"),  # type: ignore[arg-type]
     "model: expected an architecture's name"),
]


class _Raises(nn.Module):
    """A module whose own code fails on any input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ZeroDivisionError("division by zero")


@pytest.mark.parametrize(("name", "call", "words"), BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_the_api_refuses_what_the_command_line_refuses(workdir: Path, name: str, call: Any,
                                                      words: str) -> None:
    """Every bad call is a one-line PagctlError naming the parameter, never a raw exception
    nor a number: the API and the commands validate through the same functions
    (`pagctl.evaluation`)."""
    x, y = _digits_xy()
    with pytest.raises(PagctlError) as err:
        call((x, y))
    message = str(err.value)
    assert words in message, message
    assert "\n" not in message
    assert not (workdir / "s").exists()  # refused before any shard was written


def test_compare_takes_one_run_folder_as_a_path(workdir: Path) -> None:
    """``compare("runs/a")`` is the one run, not the letters of its name."""
    pg.train("digits-vanilla", overrides=["train.epochs=1", "eval.attack=null",
                                          "eval.align_source=null", "out_dir=runs/a"])
    assert [row.run_dir for row in pg.compare("runs/a").rows] == [Path("runs/a")]


def test_numpy_inputs_are_images_and_labels(workdir: Path) -> None:
    """numpy arrays are taken as tensors are (a red-team's raw AttributeError)."""
    x, y = _digits_xy()
    from_numpy = pg.attack(_ten(), (x.numpy(), y.numpy()), "fgsm", eps=0.1, probes=False,
                           indices=torch.arange(8).numpy())
    from_torch = pg.attack(_ten(), (x, y), "fgsm", eps=0.1, probes=False,
                           indices=list(range(8)))
    assert not isinstance(from_numpy, list) and not isinstance(from_torch, list)
    assert from_numpy.per_example == from_torch.per_example and from_numpy.n == 8


def _without_seconds(value: Any) -> Any:
    """A record as JSON without its timings (every key that counts seconds)."""
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [_without_seconds(v) for v in value]
    return value


def test_the_command_line_and_the_api_record_the_same_evaluation(
        workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One orchestration behind both faces: the same attack (an ε-sweep, with probes) and
    the same alignment score, run by the command and by the API on one run folder, append
    the same records to its metrics.jsonl, every field but the seconds."""
    import json

    (workdir / "linear_digits.py").write_text(
        "from torch import nn\n\n\ndef make(num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n")
    torch.manual_seed(2)
    module = _Linear()
    save_file({k: v.contiguous() for k, v in module.body.state_dict().items()},
              str(workdir / "lin.safetensors"))
    pg.import_model("runs/lin", "linear_digits:make", "digits",
                    checkpoint=workdir / "lin.safetensors")
    metrics = workdir / "runs" / "lin" / "metrics.jsonl"

    def records() -> list[dict[str, Any]]:
        lines = metrics.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def command(*argv: str) -> None:
        try:
            cli.main([*argv, "--no-progress", "--format", "json", "--trust-code"])
        except SystemExit as exc:
            assert not exc.code
        capsys.readouterr()

    before = len(records())
    command("attack", "runs/lin", "--attack", "apgd_ce", "--param", "norm=L2",
            "--param", "eps=0.5", "--eps-sweep", "0.25,0.5", "--limit", "40",
            "--batch-size", "16", "--probe-size", "20")
    reports = pg.attack("runs/lin", attack="apgd_ce", norm="L2", eps=0.5,
                        eps_sweep=[0.25, 0.5], limit=40, batch_size=16, probe_size=20,
                        trust_code=True)
    pg.record("runs/lin", reports, params_given={"norm": "L2", "eps": 0.5},
              trust_code=True)
    command("align-score", "runs/lin", "--source", "class_mean", "-k", "3", "--limit", "30",
            "--batch-size", "8", "--seed", "5")
    score = pg.align_score("runs/lin", source="class_mean", classes_per_image=3, limit=30,
                           batch_size=8, seed=5, trust_code=True)
    assert score is not None
    pg.record("runs/lin", score, params_given={}, trust_code=True)
    new = [_without_seconds(r) for r in records()[before:]]
    assert [r["kind"] for r in new] == ["attack"] * 4 + ["align"] * 2
    assert new[0:2] == new[2:4]
    assert new[4] == new[5]
    assert new[0]["reliability"] is not None and new[1]["eps"] == 0.5


def test_api_attack_warns_about_an_eps_that_holds_the_whole_pixel_box() -> None:
    """The API passes the same check as the command: a Python warning naming params.eps and
    8/255 for an L∞ eps of 8; the L2 and L1 boxes at √d and d; none at a normal eps."""
    import warnings

    from pagctl.errors import PagctlWarning
    from pagctl.robustness.budget import implausible_budget

    digits = pg.dataset("digits")  # 1 x 8 x 8: d = 64
    with pytest.warns(PagctlWarning, match=r"params\.eps: 8 is an L∞ radius .*eps=8/255"):
        pg.attack(_Linear(), digits, attack="pgd_linf", eps=8, params={"steps": 1}, limit=4,
                  probes=False)
    with pytest.warns(PagctlWarning, match=r"^eps_sweep: 4 is an L∞ radius"):  # the sweep's
        pg.attack(_Linear(), digits, attack="pgd_linf", eps_sweep=[0.1, 4],
                  params={"steps": 1}, limit=4, probes=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PagctlWarning)
        pg.attack(_Linear(), digits, attack="pgd_linf", eps="8/255", params={"steps": 1},
                  limit=4, probes=False)
    shape = (1, 8, 8)
    assert implausible_budget("linf", 0.999, shape) is None
    assert implausible_budget("linf", 1.0, shape) is not None
    assert implausible_budget("l2", 7.99, shape) is None
    assert implausible_budget("l2", 8.0, shape) is not None
    assert implausible_budget("l1", 63.9, shape) is None
    assert implausible_budget("l1", 64.0, shape) is not None
    assert implausible_budget(None, 8.0, shape) is None
