"""Grids of runs (``pagctl train SPEC --grid KEY=V1,V2 …``): the expansion, the folders, and
a grid run that skips what is finished and resumes what was interrupted."""

from __future__ import annotations

import os
import shlex
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from pagctl import checkpoint, cli
from pagctl import train as train_mod
from pagctl.grid import expand, folder_name, status
from pagctl.spec import load_spec

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["train.epochs=2", "data.batch_size=128", "eval.attack=null", "eval.limit=30"]
SETS = [a for item in FAST for a in ("--set", item)]


def _main(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        cli.main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_the_points_are_the_product_in_order_with_their_values_applied(workdir: Path) -> None:
    """The last key varies fastest; each point's spec has --set and its grid values; the
    folders sit under runs/<name>-grid by default, named by the values."""
    points = expand("digits-vanilla", ["train.momentum=0.5", "train.epochs=1"], {},
                    ["train.lr=0.05,0.1", "train.seed=1,2,3"], None)
    assert [p.label for p in points][:4] == [
        "train.lr=0.05 train.seed=1", "train.lr=0.05 train.seed=2",
        "train.lr=0.05 train.seed=3", "train.lr=0.1 train.seed=1"]
    assert [p.index for p in points] == list(range(6))
    assert [(p.spec.train.lr, p.spec.train.seed, p.spec.train.momentum) for p in points][-1] \
        == (0.1, 3, 0.5)  # the grid's values and --set, together
    assert points[0].run_dir == Path("runs/digits-vanilla-grid/train.lr=0.05__train.seed=1")
    assert all(status(p) == "new" for p in points)
    assert not Path("runs").exists()  # expanding writes nothing
    assert folder_name((("description", "a b/c"),)) == "description=a_b_c"


@pytest.mark.usefixtures("sigint_default")
def test_a_grid_skips_finished_runs_and_resumes_the_interrupted_one(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C in the second of three runs: exit 130 and how to go on. The same command again
    skips the first, resumes the second where it stopped (the weights then equal an
    uninterrupted training's, bit for bit) and starts the third."""
    argv = ["train", "digits-vanilla", *SETS, "--grid", "train.lr=0.05,0.1,0.2", "-q",
            "--out", "g"]
    real_train = train_mod.train
    calls: list[tuple[float, bool]] = []

    def spy(spec: Any, **kwargs: Any) -> Any:
        calls.append((spec.train.lr, kwargs["resume"]))

        def interrupt(epoch: int, step: int) -> None:
            if spec.train.lr == 0.1 and (epoch, step) == (0, 3) and len(calls) == 2:
                os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, handled by the loop

        return real_train(spec, **kwargs, on_step=interrupt)

    monkeypatch.setattr(train_mod, "train", spy)
    code, out, err = _main(capsys, *argv)
    assert code == 130, err
    assert "grid point 2/3 (train.lr=0.1)" in " ".join(err.split())
    assert "run the same command again" in " ".join(err.split()).lower()
    assert calls == [(0.05, False), (0.1, False)]
    middle = workdir / "g" / "train.lr=0.1"
    meta = checkpoint.read_state_counters(middle)
    assert (meta["epoch"], meta["step"]) == (0, 4)

    code, out, err = _main(capsys, *argv, "--format", "json")
    assert code == 0, err
    assert calls[2:] == [(0.1, True), (0.2, False)]  # the first is skipped
    assert "finished before, skipped" in err
    assert out.count('"status": "skipped"') == 1 and out.count('"status": "trained"') == 2

    direct = load_spec("digits-vanilla", [*FAST, "train.lr=0.1", "out_dir=direct"])
    real_train(direct, device="cpu", progress=False)
    resumed = checkpoint.load_tensors(middle / checkpoint.MODEL_FILE)
    expected = checkpoint.load_tensors(workdir / "direct" / checkpoint.MODEL_FILE)
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


def test_printed_commands_run_one_point_each(workdir: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """--print-commands: one shell line per point, each with --grid-point I; running one
    trains exactly that point, and running it again skips it."""
    argv = ["train", "digits-vanilla", *SETS, "--set", "train.epochs=1", "--grid",
            "train.lr=0.05,0.1", "--grid", "train.seed=0,1", "-q"]
    code, out, err = _main(capsys, *argv, "--print-commands")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 4 and all(line.startswith("pagctl train digits-vanilla ")
                                   for line in lines)
    assert lines[2].endswith("--grid-point 2")
    assert not Path("runs").exists()
    command = shlex.split(lines[2])[1:]
    code, out, err = _main(capsys, *command)
    assert code == 0, err
    trained = sorted(p.name for p in (workdir / "runs" / "digits-vanilla-grid").iterdir())
    assert trained == ["train.lr=0.1__train.seed=0"]
    code, out, err = _main(capsys, *command)
    assert code == 0 and "finished before, skipped" in err


def test_a_whole_grid_under_torchrun_is_refused(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under torchrun a grid runs one point per launch (--grid-point), not all in one."""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    code, _, err = _main(capsys, "train", "digits-vanilla", "--grid", "train.lr=0.1,0.2")
    assert code == 2 and "--grid-point" in err and "Traceback" not in err
    assert not Path("runs").exists()


def test_a_failing_point_stops_no_other(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A point whose training fails (a diverging λ or learning rate) is reported, the
    others are trained, the summary marks it, and the command exits 1."""
    real_train = train_mod.train

    def diverging(spec: Any, **kwargs: Any) -> Any:
        if spec.train.lr == 0.1:
            raise RuntimeError("loss became nan at epoch 1 step 5")
        return real_train(spec, **kwargs)

    monkeypatch.setattr(train_mod, "train", diverging)
    code, out, err = _main(capsys, "train", "digits-vanilla", *SETS, "--set", "train.epochs=1",
                           "--grid", "train.lr=0.1,0.05", "-q", "--format", "json")
    assert code == 1
    assert "grid point 1/2 (train.lr=0.1) failed: loss became nan" in " ".join(err.split())
    assert "1 of the grid's runs failed (--grid-point 0: train.lr=0.1)" in err
    assert '"status": "failed"' in out and '"status": "trained"' in out
    assert (workdir / "runs" / "digits-vanilla-grid" / "train.lr=0.05" /
            checkpoint.MODEL_FILE).is_file()
