"""A run folder holds one run, and a number in metrics.jsonl came from the model beside it:
whole-line appends, recovery around damaged lines, and refusals of foreign state."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import envelope_records

from pagctl import checkpoint
from pagctl.errors import CheckpointError
from pagctl.evaluation.request import EvaluationRequest
from pagctl.records import AlignRecord, AttackRecord, TrainEpochRecord, split_lines


def _attack(k: int, n: int = 10) -> AttackRecord:
    return AttackRecord(attack="pgd_l2", n=n, robust_accuracy=k / n, robust_correct=k)


# ---------------------------------------------------------------------------------------
# metrics.jsonl: whole lines or nothing


def test_an_append_after_a_damaged_last_line_starts_a_fresh_line(tmp_path: Path) -> None:
    path = tmp_path / checkpoint.METRICS_FILE
    path.write_text(json.dumps(_attack(3).to_json()) + "\n" + '{"kind": "attack", "n": 1')
    checkpoint.append_record(tmp_path, _attack(7))
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["robust_correct"] == 7
    assert [r.robust_correct for r in checkpoint.read_metrics(tmp_path).records] == [3, 7]  # type: ignore[union-attr]


def test_readers_recover_a_record_a_damaged_line_swallowed(tmp_path: Path) -> None:
    """Files written before appends started on a fresh line: the record that followed a
    partial line on the same line is read back, by compare and by the run folder."""
    from pagctl.compare.records import read_records

    first, second = json.dumps(_attack(3).to_json()), json.dumps(_attack(7).to_json())
    (tmp_path / checkpoint.METRICS_FILE).write_text(
        first + "\n" + first[:25] + second + "\n" + '{"no": "kind"}{"half": \n')
    assert [r.robust_correct for r in checkpoint.read_metrics(tmp_path).records] == [3, 7]  # type: ignore[union-attr]
    records, warnings = read_records(tmp_path)
    assert [(line, r.robust_correct) for line, r in records] == [(1, 3), (2, 7)]  # type: ignore[union-attr]
    assert len(warnings) == 2 and "line 2: not valid JSON" in warnings[0]
    assert list(split_lines(b'{"a": 1}\n\n  \nxx{"b": 2}')) == \
        [(1, b'{"a": 1}'), (4, b"xx"), (4, b'{"b": 2}')]


def test_a_failed_write_leaves_no_partial_line(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint.append_record(tmp_path, _attack(3))
    before = (tmp_path / checkpoint.METRICS_FILE).read_bytes()
    real_write = os.write

    def half_then_full(fd: int, data: bytes) -> int:  # the disk fills mid-line
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(CheckpointError, match="No space left on device.*nothing was written"):
        checkpoint.append_record(tmp_path, _attack(7))
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[:5]))  # short write
    with pytest.raises(CheckpointError, match="short write"):
        checkpoint.append_record(tmp_path, _attack(7))
    monkeypatch.setattr(os, "write", real_write)
    assert (tmp_path / checkpoint.METRICS_FILE).read_bytes() == before


def test_a_record_with_a_non_finite_number_is_refused_naming_the_field(tmp_path: Path) -> None:
    record = AlignRecord(source="s", n=1, mean=0.1, per_true_class={"3": float("nan")})
    with pytest.raises(CheckpointError, match=r"align field 'per_true_class\.3' is NaN"):
        checkpoint.append_record(tmp_path, record)
    assert not (tmp_path / checkpoint.METRICS_FILE).exists() or \
        (tmp_path / checkpoint.METRICS_FILE).read_bytes() == b""


def test_an_unwritable_metrics_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / checkpoint.METRICS_FILE).mkdir()
    with pytest.raises(CheckpointError, match="cannot append the record") as info:
        checkpoint.append_record(tmp_path, _attack(1))
    assert "\n" not in str(info.value)


def _append_many(run_dir: str, worker: int, count: int) -> None:
    for i in range(count):
        checkpoint.append_record(Path(run_dir), TrainEpochRecord(
            epoch=worker * 1000 + i, loss=0.5, monitor={"pad": "x" * (97 * (i % 40))}))


def test_concurrent_appenders_never_interleave(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), w, 60)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    lines = (tmp_path / checkpoint.METRICS_FILE).read_text().splitlines()
    epochs: list[Any] = [json.loads(line)["epoch"] for line in lines]  # every line parses
    assert sorted(epochs) == sorted(w * 1000 + i for w in range(4) for i in range(60))


# ---------------------------------------------------------------------------------------
# a run folder's files belong together

FAST = ["train.epochs=1", "data.batch_size=128", "eval.attack=null", "eval.limit=20"]


def _train(out: str, *extra: str, **kwargs: Any) -> Any:
    from pagctl.spec import load_spec
    from pagctl.train import train

    return train(load_spec("digits-vanilla", [*FAST, f"out_dir={out}", *extra]), device="cpu",
                 progress=False, **kwargs)


def test_resume_refuses_a_state_saved_by_another_run(workdir: Path) -> None:
    import shutil

    from pagctl.spec import load_spec
    from pagctl.train import train

    _train("a", "train.epochs=2")
    _train("b", "train.epochs=2", "train.lr=0.01")
    shutil.copy(workdir / "a" / checkpoint.STATE_FILE, workdir / "b" / checkpoint.STATE_FILE)
    spec_b = load_spec("digits-vanilla", [*FAST, "out_dir=b", "train.epochs=2",
                                          "train.lr=0.01"])
    with pytest.raises(CheckpointError, match=r"b/state\.safetensors was saved by another run "
                                              r"than b/spec\.json describes"):
        train(spec_b, device="cpu", progress=False, resume=True)


def test_load_run_warns_about_weights_of_another_run(workdir: Path) -> None:
    import shutil

    _train("a")
    _train("b", "train.lr=0.01")
    assert checkpoint.load_run(workdir / "b").warnings == []
    shutil.copy(workdir / "a" / checkpoint.MODEL_FILE, workdir / "b" / checkpoint.MODEL_FILE)
    warnings = checkpoint.load_run(workdir / "b").warnings
    assert len(warnings) == 1 and "model.safetensors was saved by another run" in warnings[0]


def test_a_folder_moved_or_resumed_by_another_path_still_belongs_together(
        workdir: Path) -> None:
    import shutil

    _train("a", "train.epochs=2")
    shutil.move(workdir / "a", workdir / "moved")
    assert checkpoint.load_run(workdir / "moved").warnings == []
    from pagctl.spec import load_spec
    from pagctl.train import train

    spec = load_spec(str(workdir / "moved" / "spec.json"), [], {"out_dir": Path("./moved")})
    assert train(spec, device="cpu", progress=False, resume=True).epochs_done == 2


def test_one_way_out_after_a_run_that_failed_before_saving(workdir: Path) -> None:
    def fail(epoch: int, step: int) -> None:
        raise RuntimeError("simulated failure in the first epoch")

    with pytest.raises(RuntimeError, match="simulated"):
        _train("r", on_step=fail)
    with pytest.raises(CheckpointError) as again:
        _train("r")
    with pytest.raises(CheckpointError) as resumed:
        _train("r", resume=True)
    for info in (again, resumed):  # both point at --overwrite, neither at the other one
        text = str(info.value)
        assert "--overwrite" in text and "--resume" not in text.replace("nothing to resume", "")
    assert not _train("r", overwrite=True).interrupted


# ---------------------------------------------------------------------------------------
# one run per folder: the lock


def _spec(out: str, *extra: str) -> Any:
    from pagctl.spec import load_spec

    return load_spec("digits-vanilla", [*FAST, f"out_dir={out}", *extra])


def test_two_trainings_that_both_passed_the_checks_cannot_share_a_folder(
        workdir: Path) -> None:
    """The race of two ``pagctl train --out r`` started together: both find no folder,
    both validate; the second to take the lock is refused and writes nothing."""
    first = checkpoint.RunFolder(_spec("r"), command="train", resume=False, overwrite=False)
    second = checkpoint.RunFolder(_spec("r", "train.lr=0.01"), command="train", resume=False,
                                  overwrite=False)
    with first:
        assert first.start() is None
        with pytest.raises(CheckpointError, match=r"r: in use by pid \d+ .*'pagctl train'"):
            second.__enter__()
        assert json.loads((workdir / "r" / "spec.json").read_text())["train"]["lr"] == 0.05
    assert not (workdir / "r" / checkpoint.LOCK_FILE).exists()  # released and removed


def _cli(*argv: str) -> int:
    from pagctl import cli

    try:
        cli.main(list(argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_resume_attack_and_align_score_respect_a_training(workdir: Path) -> None:
    _train("r", "train.epochs=2")
    holder = checkpoint.RunFolder(_spec("r", "train.epochs=2"), command="train", resume=True,
                                  overwrite=False)
    with holder:
        with pytest.raises(CheckpointError, match="in use by"):
            checkpoint.RunFolder(_spec("r", "train.epochs=2"), command="train", resume=True,
                                 overwrite=False).__enter__()
        assert _cli("attack", "r", "--limit", "5", "--no-probes", "--no-progress") == 2
        assert _cli("align-score", "r", "--limit", "5") == 2
    records = len(checkpoint.read_metrics(workdir / "r").records)
    with checkpoint.RunLock(workdir / "r", exclusive=False, command="attack"):
        # two evaluations at once are fine
        assert _cli("attack", "r", "--limit", "5", "--no-probes", "--no-progress") == 0
        with pytest.raises(CheckpointError, match="in use by another pagctl command"):
            checkpoint.RunFolder(_spec("r", "train.epochs=2"), command="train", resume=True,
                                 overwrite=False).__enter__()
    assert len(checkpoint.read_metrics(workdir / "r").records) == records + 1


def test_a_lock_left_by_a_killed_process_is_taken_over(workdir: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    script = ("import time\nfrom pathlib import Path\nfrom pagctl import checkpoint\n"
              "lock = checkpoint.RunLock(Path('r'), exclusive=True, command='train', "
              "create=True).acquire()\nprint('locked', flush=True)\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=workdir)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match=f"in use by pid {proc.pid} "):
            checkpoint.RunLock(workdir / "r", exclusive=True, command="train").acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert (workdir / "r" / checkpoint.LOCK_FILE).exists()  # stale: left by the killed one
    time.sleep(0.01)
    result = _train("r")  # the kernel released it: the next run simply takes it
    assert not result.interrupted and (workdir / "r" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------
# attack --state resumes only the evaluation that saved it


def test_attack_state_of_another_model_or_other_data_is_refused(tmp_path: Path) -> None:
    import torch

    from pagctl.data import TensorImageDataset
    from pagctl.errors import SpecError
    from pagctl.protocols import PluginParams
    from pagctl.robustness.engine import run_attack
    from pagctl.testing import small_data, small_model

    class Noise:
        def __call__(self, model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return (x + 0.01).clamp(0, 1)

    class Params(PluginParams):
        pass

    x, _ = small_data(12)
    model = small_model()
    with torch.no_grad():
        y = model(x).argmax(1)
    state = tmp_path / "s.state"

    def attack(m: Any, images: torch.Tensor) -> Any:
        return run_attack(m, Noise(), TensorImageDataset(images, y), torch.arange(12), name="noise",
                          params=Params(), request=EvaluationRequest(state=state, batch_size=4))

    first = attack(model, x)
    assert attack(model, x).robust_correct == first.robust_correct  # its own: resumed
    other = small_model()
    with torch.no_grad():
        other[0].weight.add_(0.01)  # type: ignore[operator]
    with pytest.raises(SpecError, match=r"its model weights differ"):
        attack(other, x)
    with pytest.raises(SpecError, match=r"its test images or labels differ"):
        attack(model, x.flip(0))


def test_cli_attack_refuses_the_state_of_another_run(workdir: Path) -> None:
    _train("a")
    _train("b", "train.lr=0.01")
    argv = ["--attack", "pgd_l2", "--limit", "20", "--no-probes", "--no-progress",
            "--state", "s.state", "--format", "json"]
    assert _cli("attack", "a", *argv) == 0
    before = checkpoint.read_metrics(workdir / "b")
    assert _cli("attack", "b", *argv) == 2
    assert checkpoint.read_metrics(workdir / "b") == before  # nothing recorded


# ---------------------------------------------------------------------------------------
# a result is shown before it is recorded; a broken model is named


def test_a_result_that_cannot_be_recorded_is_still_shown(
        workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _train("r")
    (workdir / "r" / checkpoint.METRICS_FILE).unlink()
    (workdir / "r" / checkpoint.METRICS_FILE).mkdir()  # cannot be appended to
    capsys.readouterr()
    code = _cli("attack", "r", "--limit", "10", "--no-probes", "--no-progress", "--format",
                "json")
    out, err = capsys.readouterr()
    assert code == 2 and [r["n"] for r in envelope_records(out, "attack")] == [10]
    assert err.startswith("error: the result above was not recorded: ") and \
        "cannot append the record" in err
    code = _cli("align-score", "r", "--limit", "10", "--format", "json")
    out, err = capsys.readouterr()
    assert code == 2 and [r["n"] for r in envelope_records(out, "align-score")] == [10]
    assert "was not recorded" in err


def test_a_model_with_nan_weights_is_named_as_the_cause(
        workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _train("r")
    path = workdir / "r" / checkpoint.MODEL_FILE
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    weights = load_file(str(path))
    name = next(k for k in weights if k.endswith("weight"))
    weights[name][...] = float("nan")
    save_file(weights, str(path), metadata=metadata)
    before = checkpoint.read_metrics(workdir / "r")
    for argv in (["attack", "r", "--limit", "10", "--no-progress"],
                 ["align-score", "r", "--limit", "10"]):
        capsys.readouterr()
        assert _cli(*argv) == 2
        err = capsys.readouterr().err
        assert "the model's outputs are NaN or infinite for 10 of 10 points" in err, err
        assert err.count("\n") == 1
    assert checkpoint.read_metrics(workdir / "r") == before


def test_a_diverging_first_epoch_is_one_line_and_one_way_out(
        workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["train", "digits-vanilla", "-q", "--out", "r", "--set", "train.lr=1e30", "--set",
            "data.batch_size=16", "--set", "eval.attack=null"]
    capsys.readouterr()
    assert _cli(*base) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("error: loss became nan at epoch 1")
    assert "lower train.lr" in errors[0]
    assert _cli(*base) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert _cli(*base, "--resume") == 2
    assert "again with --overwrite" in capsys.readouterr().err


AS_RECORDED = ["eval.limit=null", "eval.every=1", "train.grad_method=loop",
               "eval.attack={name: pgd_l2, params: {eps: 0.5, steps: 7}}"]
"""The built-in digits specs as those versions recorded them: their monitor then ran on
every test image after every epoch (the specs have since made it cheaper), under PGD-L2
ε 0.5 (the adversarial-training specs now monitor their trained L∞ threat), and the input
gradients' method was ``loop`` (now ``auto``, which is ``loop`` on a CPU)."""


def test_run_folders_written_before_the_adversarial_training_fields_still_match() -> None:
    """A spec saved before train.objective & co. existed keeps its digest: the hashes below
    are what the previous version recorded for these built-in specs."""
    from pagctl.checkpoint import accepted_spec_hashes, spec_hash
    from pagctl.spec import load_spec

    recorded = {"digits-vanilla": "297d890e8e3dcbac", "digits-pag-sbg": "cd3357179f50f7ee"}
    for name, digest in recorded.items():
        spec = load_spec(name, AS_RECORDED)
        run = Path(f"/nonexistent/{name}")
        assert spec_hash(spec) != digest  # the new fields are part of the digest now
        folder_spec = spec.model_copy(update={"out_dir": run})
        assert digest in accepted_spec_hashes(folder_spec), name
    # a spec that sets a new field is not mistaken for an old one
    at = load_spec("digits-pgd-at", [])
    assert not {"297d890e8e3dcbac"} & accepted_spec_hashes(at)


def test_run_folders_written_before_the_image_size_fields_still_match() -> None:
    """Folders written by the adversarial-training version (which had validation_size but
    not data.image_size & co.) keep their digests too: recorded by that version."""
    from pagctl.checkpoint import accepted_spec_hashes, spec_hash
    from pagctl.spec import load_spec

    recorded = {"digits-vanilla": "584735e658c66a30", "digits-pgd-at": "2f5b947b096ea9ab"}
    for name, digest in recorded.items():
        spec = load_spec(name, AS_RECORDED)
        assert spec_hash(spec) != digest
        assert digest in accepted_spec_hashes(spec), name
        assert digest in accepted_spec_hashes(
            spec.model_copy(update={"out_dir": Path(f"/nonexistent/{name}")})), name
