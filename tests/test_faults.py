"""Fault injection: concurrent writers on one run folder, a full disk at every write of
training and of an attack record, and ``kill -9`` at random points of training, score
training, a bank and an attack with ``--state``; each case ends with nothing lost and
nothing mixed: the folder holds one run, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import envelope_records

from pagctl import checkpoint
from pagctl.errors import CheckpointError
from pagctl.records import AttackRecord, TrainEpochRecord

FAST = ["train.epochs=2", "data.batch_size=128", "eval.attack=null", "eval.limit=20"]
ENV = {**os.environ, "PAGCTL_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"}


def _pagctl(*argv: str, cwd: Path, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pagctl", *argv], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load_tensors(run_dir / checkpoint.MODEL_FILE)


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _epochs(run_dir: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.to_json().items() if not k.endswith("_seconds")}
            for r in checkpoint.read_metrics(run_dir).of(TrainEpochRecord)]


# ---------------------------------------------------------------------------------------
# concurrent writers


def test_concurrent_trainings_into_one_folder_leave_one_run(tmp_path: Path) -> None:
    argv = ["train", "digits-vanilla", "-q", "--out", "r", *[f"--set={o}" for o in FAST]]
    procs = [_pagctl(*argv, "--set", f"train.lr={lr}", cwd=tmp_path)
             for lr in (0.05, 0.04, 0.03)]
    results = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    codes = [code for code, _ in results]
    assert codes.count(0) == 1 and codes.count(2) == 2, results
    for code, err in results:
        if code == 2:
            assert "in use by pid" in err or "already exists" in err, err
    winner = [0.05, 0.04, 0.03][codes.index(0)]
    spec = json.loads((tmp_path / "r" / "spec.json").read_text())
    assert spec["train"]["lr"] == winner
    loaded = checkpoint.load_run(tmp_path / "r")
    assert loaded.warnings == []
    assert [r["epoch"] for r in _epochs(tmp_path / "r")] == [1, 2]
    assert not (tmp_path / "r" / checkpoint.LOCK_FILE).exists()


# ---------------------------------------------------------------------------------------
# a full disk at every write


class _Full:
    """Make the k-th write of a file in the run folder fail with ENOSPC: every atomic file
    (a temporary file renamed into place: the failure lands after it was written) and every
    metrics.jsonl append."""

    def __init__(self, k: int) -> None:
        self.k, self.count = k, 0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def failing(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            if self.count == self.k:
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            return fn(*args, **kwargs)

        return failing


def test_a_full_disk_at_every_write_of_training_loses_and_mixes_nothing(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pagctl.spec import load_spec
    from pagctl.train import train

    def spec(out: str) -> Any:
        return load_spec("digits-vanilla", [*FAST, f"out_dir={out}"])

    train(spec("whole"), device="cpu", progress=False)
    real_replace, real_write = os.replace, os.write
    injected = 0
    while True:
        k = injected + 1
        full = _Full(k)
        monkeypatch.setattr(os, "replace", full.wrap(real_replace))
        monkeypatch.setattr(os, "write", full.wrap(real_write))
        out = f"run{k}"
        try:
            train(spec(out), device="cpu", progress=False)
            failed = False
        except (OSError, CheckpointError) as exc:
            failed = True
            assert "injected" in str(exc), exc
        finally:
            monkeypatch.setattr(os, "replace", real_replace)
            monkeypatch.setattr(os, "write", real_write)
        if not failed:
            break  # k is past the last write: every write was faulted once
        injected += 1
        folder = workdir / out
        if folder.exists():  # no temporary file and no lock left behind
            assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == [], k
        try:
            train(spec(out), device="cpu", progress=False, resume=True)
        except CheckpointError:  # failed before its first saved state: start it again
            train(spec(out), device="cpu", progress=False, overwrite=True)
        assert _same_weights(workdir / "whole", folder), k
        assert _epochs(workdir / "whole") == _epochs(folder), k
    # spec.json, then per epoch: the record, weights, config, state, state.json
    assert injected == 11


def test_a_file_size_limit_during_the_attack_record_writes_no_partial_line(
        tmp_path: Path) -> None:
    import resource

    run = _pagctl("train", "digits-vanilla", "-q", "--out", "r",
                  *[f"--set={o}" for o in FAST], cwd=tmp_path)
    assert run.wait(timeout=300) == 0
    metrics = tmp_path / "r" / checkpoint.METRICS_FILE
    before = metrics.read_bytes()
    limit = len(before) + 40  # room for part of the record, not all of it

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    attack = _pagctl("attack", "r", "--limit", "20", "--no-probes", "--no-progress",
                     "--format", "json", cwd=tmp_path, preexec_fn=limited)
    code = attack.wait(timeout=300)
    out, err = attack.stdout.read(), attack.stderr.read()  # type: ignore[union-attr]
    assert code == 2, err
    assert [r["n"] for r in envelope_records(out, "attack")] == [20]
    assert "the result above was not recorded" in err
    assert "short write" in err or "File too large" in err  # a partial write, then EFBIG
    assert metrics.read_bytes() == before


# ---------------------------------------------------------------------------------------
# kill -9 at random points


def _killed_then_resumed(argv: list[str], resume: list[str], cwd: Path, seed: int,
                         ready: Path | None = None, state: Path | None = None) -> int:
    """Start ``argv``, kill -9 it after a random delay, three times, then run ``resume`` to
    the end; as a user would, a run killed before it saved its first ``state`` is started
    again with --overwrite instead of resumed. Returns how many kills landed (a process
    may finish before its delay)."""
    rng = random.Random(seed)
    kills = 0
    first = argv
    for _ in range(3):
        if state is not None and not state.exists() and argv is resume:
            argv = [*first, "--overwrite"]
        proc = _pagctl(*argv, cwd=cwd)
        deadline = time.monotonic() + 120
        while ready is not None and not ready.exists() and time.monotonic() < deadline \
                and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.2, 2.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=120)
        argv = resume
    if state is not None and not state.exists():
        resume = [*first, "--overwrite"]
    done = _pagctl(*resume, cwd=cwd)
    assert done.wait(timeout=600) == 0, done.stderr.read() if done.stderr else ""
    return kills


@pytest.mark.slow
def test_kill_9_during_training_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    spec = ["digits-pag-cm", "-q", *[f"--set={o}" for o in FAST], "--set", "train.epochs=4"]
    whole = _pagctl("train", *spec, "--out", "whole", cwd=tmp_path)
    assert whole.wait(timeout=600) == 0
    kills = _killed_then_resumed(["train", *spec, "--out", "r"],
                                 ["train", "r", "--resume", "-q"], tmp_path, seed=1,
                                 ready=tmp_path / "r" / "spec.json",
                                 state=tmp_path / "r" / "state.safetensors")
    assert kills >= 1
    assert _same_weights(tmp_path / "whole", tmp_path / "r")
    assert _epochs(tmp_path / "whole") == _epochs(tmp_path / "r")


@pytest.mark.slow
def test_kill_9_during_score_training_resumes_to_the_uninterrupted_weights(
        tmp_path: Path) -> None:
    spec = ["score-toy", "-q", "--set", "model.width=16", "--set", "model.blocks=1", "--set",
            "train.steps=400", "--set", "train.batch_size=32", "--set", "train.save_every=20",
            "--set", "train.log_every=20", "--set", "sample.per_class=0"]
    whole = _pagctl("train-score", *spec, "--out", "whole", cwd=tmp_path)
    assert whole.wait(timeout=600) == 0
    kills = _killed_then_resumed(["train-score", *spec, "--out", "r"],
                                 ["train-score", "r", "--resume", "-q"], tmp_path, seed=2,
                                 ready=tmp_path / "r" / "spec.json",
                                 state=tmp_path / "r" / "state.safetensors")
    assert kills >= 1
    assert _same_weights(tmp_path / "whole", tmp_path / "r")


@pytest.mark.slow
def test_kill_9_during_a_bank_resumes_to_the_same_bank(tmp_path: Path) -> None:
    argv = ["bank", "nearest_neighbor", "--spec", "digits-pag-nn", "-q", "--batch-size", "64"]
    whole = _pagctl(*argv, "--out", "whole.safetensors", cwd=tmp_path)
    assert whole.wait(timeout=600) == 0
    _killed_then_resumed([*argv, "--out", "b.safetensors"],
                         [*argv, "--out", "b.safetensors", "--resume"], tmp_path, seed=3)
    a = checkpoint.load_tensors(tmp_path / "whole.safetensors")
    b = checkpoint.load_tensors(tmp_path / "b.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_kill_9_during_an_attack_with_state_resumes_to_the_same_result(tmp_path: Path) -> None:
    train = _pagctl("train", "digits-vanilla", "-q", "--out", "r",
                    *[f"--set={o}" for o in FAST], cwd=tmp_path)
    assert train.wait(timeout=300) == 0
    argv = ["attack", "r", "--attack", "autoattack", "--param", "norm=l2", "--param",
            "eps=0.5", "--param", "steps=20", "--param", "square_queries=100", "--limit", "120",
            "--batch-size", "20", "--no-probes", "--no-progress", "--format", "json"]
    whole = _pagctl(*argv, cwd=tmp_path)
    assert whole.wait(timeout=600) == 0
    [expected] = envelope_records(whole.stdout.read(), "attack")  # type: ignore[union-attr]
    with_state = [*argv, "--state", "aa.state"]
    kills = _killed_then_resumed(with_state, with_state, tmp_path, seed=4,
                                 ready=tmp_path / "aa.state")
    records = [r.to_json() for r in checkpoint.read_metrics(tmp_path / "r").of(AttackRecord)]
    assert kills >= 1
    assert records[-1]["per_example"] == expected["per_example"]
    assert [(s["attacked"], s["broke"]) for s in records[-1]["stages"]] == \
        [(s["attacked"], s["broke"]) for s in expected["stages"]]
