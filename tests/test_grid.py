"""Grids of runs (``pagctl train SPEC --grid KEY=V1,V2 …``): the expansion, the folders, and
a grid run that skips what is finished and resumes what was interrupted."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import envelope_records

from pagctl import checkpoint, cli
from pagctl import train as train_mod
from pagctl.errors import CheckpointError, SpecError
from pagctl.grid import GRID_LOCK_FILE, GridLock, check_folders, expand, folder_name, status
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
    trains exactly that point (with the options given: its summary in JSON), and running it
    again skips it."""
    argv = ["train", "digits-vanilla", *SETS, "--set", "train.epochs=1", "--grid",
            "train.lr=0.05,0.1", "--grid", "train.seed=0,1", "-q", "--format", "json"]
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
    [record] = envelope_records(out, "train")
    assert record["status"] == "trained" and record["values"] == {"train.lr": "0.1",
                                                                  "train.seed": "0"}
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


def test_printed_commands_keep_every_option_given(workdir: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Every option of train that applies to a point is in each printed command, as given;
    with --grid-point, the one command of that point."""
    options = ["--set", "train.epochs=1", "--grid", "train.lr=0.05,0.1", "--data-dir", "d",
               "--out", "g", "--download", "--trust-code", "--full-monitor", "--device", "cpu",
               "--dry-run", "--quiet", "--format", "json"]
    code, out, err = _main(capsys, "train", "digits-vanilla", *options, "--print-commands")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    for index, line in enumerate(lines):
        words = shlex.split(line)
        assert words[:3] == ["pagctl", "train", "digits-vanilla"]
        assert words[-2:] == ["--grid-point", str(index)]
        pairs = {(a, b) for a, b in zip(words, words[1:], strict=False)}
        for option, value in zip(options, options[1:], strict=False):
            if option.startswith("--") and not value.startswith("--"):
                assert (option, value) in pairs, (option, line)
            elif option.startswith("--"):
                assert option in words, (option, line)
    code, out, err = _main(capsys, "train", "digits-vanilla", *options, "--grid-point", "1",
                           "--print-commands")
    assert code == 0 and out == lines[1] + "\n", err
    assert not (workdir / "g").exists() and not (workdir / "d").exists()


@pytest.mark.parametrize("option", [["--set", "out_dir=mine"], ["--grid", "out_dir=a,b"]])
def test_out_dir_is_the_grids_to_decide(workdir: Path, capsys: pytest.CaptureFixture[str],
                                        option: list[str]) -> None:
    """The grid names each point's folder: out_dir as --set or --grid is refused, not
    ignored, with the way to choose the root."""
    grid = [] if option[0] == "--grid" else ["--grid", "train.lr=0.05,0.1"]
    code, out, err = _main(capsys, "train", "digits-vanilla", *option, *grid, "--dry-run")
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"error: {option[0]} out_dir: a grid names each point's folder after its values, under "
        "the grid's root; give the root with --out ROOT"]
    assert list(workdir.iterdir()) == []


def test_the_grid_lock_is_shared_by_one_grid_and_refused_to_another(tmp_path: Path) -> None:
    """The commands of one grid (same digest) hold the root together; another grid is
    refused, naming the command that started the running one, until the last holder leaves,
    which removes the lock file and the folders the lock made."""
    root = tmp_path / "a" / "g"
    first = GridLock(root, "d1", command="train x --grid k=1,2").acquire()
    assert (root / GRID_LOCK_FILE).is_file()
    job = GridLock(root, "d1", command="train x --grid k=1,2").acquire()  # a --grid-point job
    refusal = (rf"^{root}: another grid runs into this folder, started by pid {os.getpid()} "
               r"on .* \('pagctl train x --grid k=1,2' since .*\); one grid at a time in a "
               r"root: wait for it to end, or give this grid another --out$")
    with pytest.raises(CheckpointError, match=refusal):
        GridLock(root, "d2", command="train x --grid k=3").acquire()
    job.release()
    with pytest.raises(CheckpointError, match=refusal):
        GridLock(root, "d2", command="train x --grid k=3").acquire()
    first.release()
    assert not (tmp_path / "a").exists()
    with GridLock(root, "d2", command="train x --grid k=3"):  # free again
        assert (root / GRID_LOCK_FILE).is_file()
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        GridLock(tmp_path / "file", "d1", command="train").acquire()


def _pagctl_process(cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """``pagctl ARGV`` in a process of its own (the CLI, as a second user would run it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PAGCTL_DISABLE_PLUGIN_AUTOLOAD="1")
    return subprocess.run([sys.executable, "-m", "pagctl", *argv], capture_output=True,
                          text=True, cwd=cwd, env=env, stdin=subprocess.DEVNULL, timeout=300,
                          check=False)


def _while_training(monkeypatch: pytest.MonkeyPatch, during: Any) -> list[Any]:
    """Make the first point this process trains call ``during()`` first (while the grid
    holds its root), keeping what it returns."""
    real_train = train_mod.train
    seen: list[Any] = []

    def spy(spec: Any, **kwargs: Any) -> Any:
        if not seen:
            seen.append(during())
        return real_train(spec, **kwargs)

    monkeypatch.setattr(train_mod, "train", spy)
    return seen


def test_a_second_grid_into_a_running_grids_root_is_refused_at_once(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While one grid trains into g, another grid (other values) into g, in a process of its
    own, is refused with one line naming the running grid, exit 2, and writes nothing; the
    running grid is unharmed."""
    grid = ["train", "digits-vanilla", *SETS, "--set", "train.epochs=1", "-q", "--out", "g"]
    seen = _while_training(monkeypatch, lambda: (
        sorted(os.listdir(workdir / "g")),
        _pagctl_process(workdir, *grid, "--grid", "train.lr=0.05,0.2"),
        sorted(os.listdir(workdir / "g"))))
    code, out, err = _main(capsys, *grid, "--grid", "train.lr=0.05,0.1")
    assert code == 0, err
    [(before, other, after)] = seen
    assert other.returncode == 2 and other.stdout == "", other.stderr[-2000:]
    [line] = other.stderr.splitlines()
    assert re.fullmatch(
        rf"error: g: another grid runs into this folder, started by pid {os.getpid()} on \S+ "
        r"\('pagctl train digits-vanilla --grid train\.lr=0\.05,0\.1' since [\d: -]+\); one "
        r"grid at a time in a root: wait for it to end, or give this grid another --out",
        line), line
    assert before == after == [GRID_LOCK_FILE]  # nothing written by the refused grid
    assert sorted(os.listdir(workdir / "g")) == ["train.lr=0.05", "train.lr=0.1"]  # no lock


def test_the_points_of_one_grid_run_at_once(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--grid-point 0 here and --grid-point 1 in a process of its own, at the same time (a
    scheduler's array): both train their point."""
    grid = ["train", "digits-vanilla", *SETS, "--set", "train.epochs=1", "-q", "--out", "g",
            "--grid", "train.lr=0.05,0.1"]
    seen = _while_training(monkeypatch,
                           lambda: _pagctl_process(workdir, *grid, "--grid-point", "1"))
    code, out, err = _main(capsys, *grid, "--grid-point", "0")
    assert code == 0, err
    [other] = seen
    assert other.returncode == 0, other.stderr[-2000:]
    assert "grid point 2/2 (train.lr=0.1): starting" in other.stderr
    assert sorted(os.listdir(workdir / "g")) == ["train.lr=0.05", "train.lr=0.1"]  # no lock
    for name in ("train.lr=0.05", "train.lr=0.1"):
        assert checkpoint.read_state_counters(workdir / "g" / name)["epoch"] == 1, name


def test_a_point_another_command_trains_is_left_to_it_in_the_grids_words(
    workdir: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A point whose folder another command holds (a job of the same grid) is not trained
    twice: the grid says who has it and goes on, then exits 1; no run folder's advice
    (--resume, --out) that a grid would refuse."""
    held = workdir / "g" / "train.lr=0.05"
    with checkpoint.RunLock(held, exclusive=True, command="train", create=True):
        code, out, err = _main(capsys, "train", "digits-vanilla", *SETS, "--set",
                               "train.epochs=1", "--grid", "train.lr=0.05,0.1", "-q",
                               "--out", "g", "--format", "json")
    assert code == 1
    text = " ".join(err.split())
    assert (f"grid point 1/2 (train.lr=0.05): being trained by pid {os.getpid()} on "
            in text)
    assert "left to it: run the grid again when that ends" in text
    assert ("error: 1 of the grid's runs was being trained by another command (--grid-point 0: "
            "train.lr=0.05): run the grid again when that ends; the others are done") in text
    assert "--resume" not in err and "--out" not in err
    rows = envelope_records(out, "train")
    assert [r["status"] for r in rows] == ["busy", "trained"]
    assert not held.exists()  # (the lock's folder, removed with it: nothing trained there)


def test_an_unreadable_state_is_refused_in_the_grids_words(workdir: Path) -> None:
    """Not the run folder's advice (--overwrite, which for a grid replaces every run)."""
    [point] = expand("digits-vanilla", [], {}, ["train.lr=0.1"], Path("g"))
    point.run_dir.mkdir(parents=True)
    (point.run_dir / checkpoint.STATE_FILE).write_bytes(b"not safetensors")
    with pytest.raises(SpecError) as info:
        check_folders([point])
    assert str(info.value) == (
        "--grid point 0 (train.lr=0.1): g/train.lr=0.1/state.safetensors is not a readable "
        "training state; give another --out, or --overwrite to replace the grid's runs")
