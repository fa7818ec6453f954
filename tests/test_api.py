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
from pagctl.errors import SpecError

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
    with pytest.raises(SpecError, match=r"pixels in \[0, 1\]"):
        pg.tensors(torch.randn(4, 1, 8, 8) * 5, torch.arange(4))
    with pytest.raises(SpecError, match="mean and std together"):
        pg.wrap(module, mean=[0.5])
