"""The command line, called in-process through its real entry point `pagctl.cli.main`.

Bad input must exit 2 with one ``error: `` line per problem that names the field or option
and says what to do, never print a traceback, and never create or change a run folder.
One tiny run is trained once per module; tests that corrupt or extend it work on a copy.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import envelope_records

from pagctl import cli, registry
from pagctl.checkpoint import BEST_MODEL_FILE, RUN_FILES, read_metrics
from pagctl.records import AttackRecord

RunCLI = Callable[..., tuple[int, str, str]]
TINY_TRAIN = ["--set", "train.epochs=1", "--set", "eval.limit=40", "-q"]


def _call_main(argv: list[str]) -> int:
    """Exit code of ``pagctl argv``; main() may return normally on success."""
    try:
        cli.main([str(a) for a in argv])
    except SystemExit as exc:
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else 1
    return 0


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> RunCLI:
    """``run(*argv) -> (exit code, stdout, stderr)``."""

    def _run(*argv: str | Path) -> tuple[int, str, str]:
        capsys.readouterr()  # drop anything printed before this call
        code = _call_main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return _run


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str, str]:
    """One finished 1-epoch digits run: (run folder, exit code, stdout, stderr)."""
    run_dir = tmp_path_factory.mktemp("trained") / "digits-run"
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAGCTL_DISABLE_PLUGIN_AUTOLOAD", "1")
        mp.setenv("PAGCTL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = _call_main(["train", "digits-vanilla", *TINY_TRAIN, "--out", str(run_dir),
                               "--format", "json"])
    return run_dir, code, out.getvalue(), err.getvalue()


@pytest.fixture
def trained_run(trained: tuple[Path, int, str, str]) -> Path:
    run_dir, code, _, err = trained
    assert code == 0, f"training the shared run failed:\n{err}"
    return run_dir


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for folders)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def _copy_run(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst)
    return dst


def _write_cifar10(root: Path, *, bad_label: bool = False) -> None:
    """A tiny CIFAR-10 in torchvision's on-disk layout (4 images per batch)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [0, 1, 2, 10 if bad_label and name == "data_batch_1" else 3]
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                         "labels": labels}, fh, protocol=2)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, fh, protocol=2)


# ---------------------------------------------------------------------------------------
# bad input: exit 2, one line per problem, no traceback, nothing written


@dataclass
class Env:
    """What a case's ``prepare`` may use: the working folder, the shared run, monkeypatch."""

    workdir: Path
    monkeypatch: pytest.MonkeyPatch
    _get_run: Callable[[], Path]

    def copy_run(self, rel: str = "run") -> Path:
        return _copy_run(self._get_run(), self.workdir / rel)


@dataclass
class Case:
    id: str
    argv: list[str]
    needles: tuple[str, ...]  # each must appear in stderr (case-insensitive)
    prepare: Callable[[Env], object] | None = None
    lines: int = 1


def _write(rel: str, text: str) -> Callable[[Env], object]:
    return lambda env: (env.workdir / rel).write_text(text)


def _truncate(rel: str) -> Callable[[Env], object]:
    def prepare(env: Env) -> None:
        path = env.copy_run() / rel
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    return prepare


def _foreign_weights(env: Env) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.ones(3, 3), "head.bias": torch.zeros(2)},
              str(env.copy_run() / "model.safetensors"))


def _edit_config(**changes: object) -> Callable[[Env], object]:
    def prepare(env: Env) -> None:
        path = env.copy_run() / "config.json"
        cfg = json.loads(path.read_text())
        cfg.update(changes)
        path.write_text(json.dumps(cfg))

    return prepare


def _remove(*names: str) -> Callable[[Env], object]:
    def prepare(env: Env) -> None:
        run_dir = env.copy_run()
        for name in names:
            (run_dir / name).unlink()

    return prepare


def _nan_pixels(env: Env) -> None:
    """A real CIFAR-10 folder whose reader hands back float pixels with one NaN."""
    import torch

    from pagctl.data import formats

    _write_cifar10(env.workdir / "cifar")
    real_read = formats.DatasetFiles.read

    def read(self: formats.DatasetFiles, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = real_read(self, split)
        images = images.float() / 255
        images[0, 0, 0, 0] = float("nan")
        return images, labels

    env.monkeypatch.setattr(formats.DatasetFiles, "read", read)


TRAIN = ["train", "digits-vanilla", "-q"]
PAG_NN = ["train", "digits-pag-nn", "-q", "--dry-run"]

BAD_INPUT = [
    # the spec file itself
    Case("missing-spec-file", ["train", "nope.yaml"], ("nope.yaml", "does not exist",
                                                       "pagctl train --list")),
    Case("garbled-yaml", ["train", "bad.yaml"], ("bad.yaml", "not valid yaml", "fix the syntax"),
         _write("bad.yaml", "model: [\n  arch: x\n")),
    Case("garbled-json", ["train", "bad.json"], ("bad.json", "not valid yaml/json"),
         _write("bad.json", '{"model":')),
    Case("spec-is-a-list", ["train", "list.yaml"], ("list.yaml", "must be a mapping", "list"),
         _write("list.yaml", "- model\n- data\n")),
    Case("unknown-builtin", ["train", "digits-vanila"], ("digits-vanila",
                                                         "did you mean 'digits-vanilla'")),
    Case("no-spec", ["train"], ("spec", "pagctl train --list")),
    Case("folder-without-spec", ["train", "empty"], ("empty", "without spec.json"),
         lambda env: (env.workdir / "empty").mkdir()),
    # --set and spec validation
    Case("unknown-top-level-key", [*TRAIN, "--set", "bogus=1"], ("bogus", "unknown key",
                                                                 "remove it")),
    Case("unknown-nested-key", [*TRAIN, "--set", "train.bogus=1"], ("train.bogus",
                                                                    "unknown key")),
    Case("wrong-type", [*TRAIN, "--set", "train.epochs=abc"], ("train.epochs", "integer",
                                                               "'abc'")),
    Case("negative-lr", [*TRAIN, "--set", "train.lr=-1"], ("train.lr", "greater than 0")),
    Case("zero-batch-size", [*TRAIN, "--set", "data.batch_size=0"], ("data.batch_size",
                                                                     "greater than or equal")),
    Case("two-problems", [*TRAIN, "--set", "train.lr=-1", "--set", "data.batch_size=0"],
         ("train.lr", "data.batch_size"), lines=2),
    Case("unknown-dataset", [*TRAIN, "--set", "data.dataset=imagenet"], ("data.dataset",
                                                                        "'cifar10'")),
    Case("malformed-set", [*TRAIN, "--set", "train.epochs"], ("--set", "key=value",
                                                              "train.epochs=5")),
    Case("set-into-a-value", [*TRAIN, "--set", "train.epochs.x=1"], ("--set",
                                                                     "not a section")),
    Case("batch-larger-than-data", [*TRAIN, "--set", "data.batch_size=5000"],
         ("data.batch_size", "lower it")),
    # model
    Case("unknown-arch", [*TRAIN, "--set", "model.arch=resnet81"], ("model.arch",
                                                                    "did you mean 'resnet18'")),
    Case("bad-model-kwargs", [*TRAIN, "--set", "model.kwargs.bogus=3"], ("model.kwargs",
                                                                        "bogus")),
    Case("reserved-model-kwarg", [*TRAIN, "--set", "model.kwargs.num_classes=3"],
         ("model.kwargs.num_classes", "remove it")),
    Case("mean-length", [*TRAIN, "--set", "model.mean=[0.1,0.2]"], ("model.mean",
                                                                   "give 1 values")),
    # plugins in the spec
    Case("unknown-source", [*TRAIN, "--set", "target_gradients.name=nearest_neighbour"],
         ("target_gradients.name", "did you mean 'nearest_neighbor'", "pagctl plugins")),
    Case("bad-source-param", [*PAG_NN, "--set", "target_gradients.params.pool_size=0"],
         ("target_gradients.params.pool_size", "greater than or equal to 1")),
    Case("unknown-source-param", [*PAG_NN, "--set", "target_gradients.params.bogus=1"],
         ("target_gradients.params.bogus", "unknown key")),
    Case("unknown-eval-attack", [*TRAIN, "--set", "eval.attack.name=cw"],
         ("eval.attack.name", "'cw'", "pgd_l2")),
    Case("bad-eval-attack-param", [*TRAIN, "--set", "eval.attack.params.eps=-1"],
         ("eval.attack.params.eps", "greater than or equal to 0")),
    Case("k-above-classes", [*TRAIN, "--set", "train.classes_per_image=11"],
         ("train.classes_per_image", "at most 10")),
    # data
    Case("needs-data-dir", [*TRAIN, "--set", "data.dataset=cifar10"], ("data.root",
                                                                      "--data-dir")),
    Case("empty-data-dir", [*TRAIN, "--set", "data.dataset=cifar10", "--data-dir", "data"],
         ("data.root", "cifar-10-batches-py", "missing", "--download"),
         lambda env: (env.workdir / "data").mkdir()),
    Case("label-out-of-range", [*TRAIN, "--set", "data.dataset=cifar10", "--data-dir", "cifar"],
         ("cifar10 (train)", "label(s) outside [0, 10)"),
         lambda env: _write_cifar10(env.workdir / "cifar", bad_label=True)),
    Case("nan-pixels", [*TRAIN, "--set", "data.dataset=cifar10", "--data-dir", "cifar"],
         ("data:", "non-finite", "nan", "fix or remove"), _nan_pixels),
    # run folder and flags
    Case("existing-run-folder", TRAIN, ("runs/digits-vanilla", "already exists", "--resume",
                                        "--overwrite"),
         lambda env: env.copy_run("runs/digits-vanilla")),
    Case("overwrite-with-bad-arch", [*TRAIN, "--out", "run", "--overwrite", "--set",
                                     "model.arch=resnet81"], ("model.arch", "did you mean"),
         lambda env: env.copy_run()),
    Case("resume-without-folder", [*TRAIN, "--resume"], ("nothing to resume",
                                                        "without --resume")),
    Case("resume-without-state", ["train", "run", "--resume", "-q"], ("state.safetensors",
                                                                      "again with --overwrite"),
         _remove("state.safetensors", "state.json")),
    Case("rerun-without-state", [*TRAIN, "--out", "run"], ("no saved state", "--overwrite"),
         _remove("state.safetensors", "state.json")),
    Case("resume-and-overwrite", [*TRAIN, "--resume", "--overwrite"], ("--resume",
                                                                      "--overwrite", "pick one")),
    Case("resume-changed-spec", ["train", "run", "--resume", "-q", "--set", "train.epochs=2"],
         ("--resume", "spec differs", "--overwrite"), lambda env: env.copy_run()),
    Case("resume-truncated-state", ["train", "run", "--resume", "-q"],
         ("state.safetensors", "truncated"), _truncate("state.safetensors")),
    Case("unknown-device", [*TRAIN, "--device", "tpu"], ("--device", "'tpu'",
                                                        "auto, cpu or cuda")),
    Case("unknown-option", [*TRAIN, "--bogus"], ("--bogus", "pagctl train --help")),
    Case("unknown-command", ["trian"], ("'trian'", "did you mean 'train'")),
    # attack: options
    Case("attack-missing-run", ["attack", "nowhere"], ("nowhere", "no such run folder",
                                                       "pagctl train")),
    Case("attack-unknown-name", ["attack", "nowhere", "--attack", "pgd_l3"],
         ("--attack", "'pgd_l3'", "did you mean 'pgd_l2'")),
    Case("attack-negative-eps", ["attack", "nowhere", "--param", "eps=-1"],
         ("--param eps", "greater than or equal to 0")),
    Case("attack-eps-not-a-number", ["attack", "nowhere", "--param", "eps=abc"],
         ("--param eps", "'abc'", "8/255")),
    Case("attack-zero-steps", ["attack", "nowhere", "--param", "steps=0"],
         ("--param steps", "greater than or equal to 1")),
    Case("attack-unknown-param", ["attack", "nowhere", "--param", "bogus=1"],
         ("--param bogus", "unknown key", "pagctl plugins pgd_l2")),
    Case("attack-negative-seed", ["attack", "nowhere", "--seed", "-1"], ("--seed",)),
    Case("attack-huge-seed", ["attack", "nowhere", "--seed", str(2**64)], ("--seed",)),
    # what training refuses, the dry run refuses, without the network
    Case("dry-run-missing-bank", [*PAG_NN, "--set", "target_gradients.name=precomputed",
                                  "--set", "target_gradients.params={path: nope.safetensors}"],
         ("target_gradients", "nope.safetensors", "pagctl bank")),
    Case("dry-run-missing-score-run", [*PAG_NN, "--set", "target_gradients.name=sbg", "--set",
                                       "target_gradients.params={run: nowhere}"],
         ("target_gradients", "nowhere")),
    Case("dry-run-existing-folder", [*PAG_NN, "--out", "run"], ("run", "already exists"),
         lambda env: env.copy_run()),
    Case("pretrained-without-download", [*PAG_NN, "--set", "model.arch=resnet18", "--set",
                                         "model.kwargs.pretrained=true"],
         ("model.kwargs.pretrained", "--download", "pretrained_cfg_overlay")),
    Case("unknown-model-kwarg", [*PAG_NN, "--set", "model.kwargs.wdth=2"],
         ("model.kwargs.wdth", "not an argument of pagctl_small_cnn")),
    Case("out-is-the-current-folder", [*TRAIN, "--out", ""], ("out_dir", "give a folder name")),
    Case("spec-with-duplicate-keys", ["train", "dup.yaml"], ("dup.yaml", "'train'", "twice"),
         _write("dup.yaml", "name: x\nmodel: {arch: pagctl_small_cnn}\ndata: {dataset: "
                "digits}\ntrain: {epochs: 1}\ntrain: {epochs: 2}\n")),
    Case("bank-over-a-folder", ["bank", "class_mean", "--spec", "digits-pag-cm", "--out",
                                "d.safetensors", "--overwrite", "-q"],
         ("d.safetensors", "is a folder"), lambda env: (env.workdir / "d.safetensors").mkdir()),
    Case("attack-param-without-equals", ["attack", "nowhere", "--param", "eps"],
         ("--param", "key=value", "eps=0.5")),
    Case("attack-zero-limit", ["attack", "nowhere", "--limit", "0"], ("--limit",
                                                                      "pagctl attack --help")),
    Case("attack-unknown-format", ["attack", "nowhere", "--format", "xml"], ("--format",
                                                                           "'xml'")),
    Case("attack-eps-infinite", ["attack", "nowhere", "--param", "eps=inf"],
         ("--param eps", "finite number (got inf)")),
    # several run folders: refused before anything runs
    Case("attack-two-runs-with-state", ["attack", "a", "b", "--state", "s"],
         ("--state", "one run folder"),
         prepare=lambda env: (env.copy_run("a"), env.copy_run("b"))),
    Case("attack-two-runs-one-not-a-run", ["attack", "a", "nowhere"], ("nowhere",),
         prepare=lambda env: env.copy_run("a")),
    Case("attack-two-runs-one-without-weights", ["attack", "a", "b"], ("b", "model.safetensors"),
         prepare=lambda env: (env.copy_run("a"), env.copy_run("b"),
                              (env.workdir / "b" / "model.safetensors").unlink())),
    Case("attack-same-run-twice", ["attack", "a", "./a"], ("given twice",),
         prepare=lambda env: env.copy_run("a")),
    Case("align-two-runs-with-images", ["align-score", "a", "b", "--save-images", "g.png"],
         ("--save-images", "one run folder"),
         prepare=lambda env: (env.copy_run("a"), env.copy_run("b"))),
    # grids of runs: refused before anything runs, naming the point
    Case("grid-not-key-value", [*TRAIN, "--grid", "train.lr"], ("--grid", "KEY=V1,V2")),
    Case("grid-empty-list", [*TRAIN, "--grid", "train.lr="], ("--grid train.lr", "non-empty")),
    Case("grid-empty-value", [*TRAIN, "--grid", "train.lr=0.1,,0.2"],
         ("--grid train.lr", "non-empty")),
    Case("grid-key-twice", [*TRAIN, "--grid", "train.lr=0.1", "--grid", "train.lr=0.2"],
         ("--grid train.lr", "given twice")),
    Case("grid-unknown-key", [*TRAIN, "--grid", "train.lrr=0.1,0.2"],
         ("--grid point 0 (train.lrr=0.1)", "train.lrr")),
    Case("grid-bad-value-of-one-point", [*TRAIN, "--grid", "train.lr=0.1,-1"],
         ("--grid point 1 (train.lr=-1)", "train.lr")),
    Case("grid-one-run-twice", [*TRAIN, "--grid", "train.lr=0.5,0.50"],
         ("points 0 (train.lr=0.5) and 1 (train.lr=0.50)", "same run")),
    Case("grid-one-folder-twice", [*TRAIN, "--grid", "description=a/b,a_b"],
         ("share the folder", "description=a_b")),
    Case("grid-set-and-grid-same-key", [*TRAIN, "--set", "train.lr=0.5", "--grid",
                                        "train.lr=0.1,0.2"], ("--set train.lr", "drop one")),
    Case("grid-folder-name-too-long", [*TRAIN, "--grid", f"description={'x' * 300},b"],
         ("--grid point 0", "255")),
    Case("grid-print-commands-with-overwrite", [*TRAIN, "--grid", "train.lr=0.1,0.2",
                                                "--print-commands", "--overwrite"],
         ("--overwrite", "from scratch")),
    Case("grid-point-out-of-range", [*TRAIN, "--grid", "train.lr=0.1,0.2", "--grid-point",
                                     "2"], ("--grid-point", "0 … 1")),
    Case("grid-point-without-grid", [*TRAIN, "--grid-point", "0"], ("--grid-point", "--grid")),
    Case("grid-with-resume", [*TRAIN, "--grid", "train.lr=0.1,0.2", "--resume"],
         ("--resume", "resumes its interrupted runs")),
    Case("grid-over-a-run-folder", ["train", "run", "--grid", "train.lr=0.1"],
         ("--grid", "run folder"), prepare=lambda env: env.copy_run()),
    Case("grid-folder-of-another-spec", [*TRAIN, "--grid", "train.lr=0.1", "--out", "g"],
         ("--grid point 0", "another spec"),
         prepare=lambda env: env.copy_run("g/train.lr=0.1")),
    Case("attack-shard-out-of-range", ["attack", "nowhere", "--shard", "2/2"],
         ("--shard", "0 <= I < N", "'2/2'")),
    Case("attack-shard-not-a-fraction", ["attack", "nowhere", "--shard", "half"],
         ("--shard", "I/N", "'half'")),
    Case("attack-shard-and-merge", ["attack", "nowhere", "--shard", "0/2", "--merge-shards",
                                    "2"], ("--shard, --merge-shards", "not both")),
    Case("attack-shard-with-plot", ["attack", "nowhere", "--shard", "0/2", "--eps-sweep",
                                    "0.5,1", "--plot", "p.png"], ("--plot", "--merge-shards")),
    Case("attack-shard-with-state", ["attack", "nowhere", "--shard", "0/2", "--state", "s"],
         ("--state", "RUN/shards/")),
    Case("attack-norm-it-lacks", ["attack", "nowhere", "--attack", "fgsm", "--param",
                                  "norm=l1"], ("--param norm", "'linf'", "'l2'")),
    Case("attack-l2-only-attack-given-norm", ["attack", "nowhere", "--attack", "cw_l2",
                                              "--param", "norm=linf"],
         ("--param norm", "unknown key")),
    Case("attack-autoattack-unknown-version", ["attack", "nowhere", "--attack", "autoattack",
                                               "--param", "version=fast"],
         ("--param version", "'standard'", "'rand'")),
    Case("attack-plot-without-sweep", ["attack", "nowhere", "--plot", "c.png"],
         ("--plot", "--eps-sweep")),
    Case("attack-plot-unknown-format", ["attack", "nowhere", "--eps-sweep", "0.5,1", "--plot",
                                        "c.jpg"], ("--plot", "'.jpg'", ".png, .pdf or .svg")),
    Case("attack-images-not-png-but-pdf", ["attack", "nowhere", "--save-images", "g.pdf"],
         ("--save-images", ".png")),
    Case("attack-dpi-without-a-figure", ["attack", "nowhere", "--dpi", "300"],
         ("--dpi", "--plot and --save-images")),
    Case("attack-images-not-png", ["attack", "nowhere", "--save-images", "grid.jpg"],
         ("--save-images", ".png")),
    Case("attack-sweep-not-a-number", ["attack", "nowhere", "--eps-sweep", "0.5,abc"],
         ("--eps-sweep", "'abc'", "8/255")),
    Case("attack-sweep-negative", ["attack", "nowhere", "--eps-sweep", "0.5,-1"],
         ("--eps-sweep", "'-1'", ">= 0")),
    Case("attack-sweep-duplicate", ["attack", "nowhere", "--eps-sweep", "0.5,1/2"],
         ("--eps-sweep", "twice")),
    Case("attack-probe-size-zero", ["attack", "nowhere", "--probe-size", "0"],
         ("--probe-size",)),
    Case("attack-indices-missing", ["attack", "nowhere", "--indices", "idx.txt"],
         ("--indices", "idx.txt", "no such file", "START:STOP")),
    Case("attack-indices-not-integers", ["attack", "nowhere", "--indices", "idx.txt"],
         ("--indices", "integers"), _write("idx.txt", "1, 2, x")),
    Case("attack-indices-duplicate", ["attack", "nowhere", "--indices", "idx.txt"],
         ("--indices", "index 2 appears twice"), _write("idx.txt", "1 2\n2")),
    Case("attack-indices-empty", ["attack", "nowhere", "--indices", "idx.txt"],
         ("--indices", "no index"), _write("idx.txt", "  \n")),
    Case("attack-indices-huge", ["attack", "nowhere", "--indices", "idx.txt"],
         ("--indices", "far outside any test set"),
         _write("idx.txt", "1 99999999999999999999999")),
    Case("attack-indices-not-ascii", ["attack", "nowhere", "--indices", "idx.txt"],
         ("--indices", "integers"), _write("idx.txt", "1 \u0663 1_0")),
    Case("attack-eps-overflow", ["attack", "nowhere", "--param", "eps=1e400"],
         ("eps", "finite number")),
    Case("attack-eps-sweep-overflow", ["attack", "nowhere", "--eps-sweep", "0.1,1e400"],
         ("--eps-sweep", "1e400", "not a valid eps")),
    Case("spec-key-not-a-name", ["train", "k.yaml", "--dry-run"],
         ("k.yaml", "a key is a list, not a name"), _write("k.yaml", "? [a, b]\n: 1\n")),
    Case("attack-indices-out-of-range", ["attack", "run", "--indices", "idx.txt"],
         ("--indices", "index 5000 is outside", "0..359"),
         lambda env: (env.copy_run(), (env.workdir / "idx.txt").write_text("[0, 5000]"))),
    Case("align-unknown-source", ["align-score", "nowhere", "--source", "nearest_neighbour"],
         ("--source", "did you mean 'nearest_neighbor'")),
    Case("align-bad-source-param", ["align-score", "nowhere", "--source", "class_mean",
                                    "--param", "scale=-1"],
         ("--param scale", "greater than or equal to 0")),
    Case("align-zero-k", ["align-score", "nowhere", "-k", "0"], ("--classes-per-image",)),
    Case("align-images-not-png", ["align-score", "nowhere", "--save-images", "g.svg"],
         ("--save-images", ".png")),
    Case("align-too-many-classes", ["align-score", "run", "-k", "11", "--limit", "5"],
         ("--classes-per-image", "11", "10 classes"), lambda env: env.copy_run()),
    Case("score-unknown-spec", ["train-score", "score-digitz"], ("score-digitz",)),
    Case("score-unknown-key", ["train-score", "score-toy", "--set", "train.stepz=3"],
         ("train.stepz",)),
    Case("bank-unknown-source", ["bank", "class_man", "--spec", "digits-pag-cm", "--out",
                                 "b.safetensors"], ("class_man", "did you mean 'class_mean'")),
    Case("bank-not-safetensors", ["bank", "class_mean", "--spec", "digits-pag-cm", "--out",
                                  "b.pt"], ("--out", ".safetensors")),
    Case("bank-bad-param", ["bank", "class_mean", "--spec", "digits-pag-cm", "--out",
                            "b.safetensors", "--param", "scale=-2"],
         ("--param scale", "greater than or equal to 0")),
    # attack: a damaged run folder
    Case("truncated-weights", ["attack", "run", "--limit", "5"],
         ("model.safetensors", "truncated", "re-run training"), _truncate("model.safetensors")),
    Case("foreign-weights", ["attack", "run", "--limit", "5"],
         ("model.safetensors", "do not match", "different runs"), _foreign_weights),
    Case("config-architecture-differs", ["attack", "run", "--limit", "5"],
         ("config.json", "'pagctl_mlp'", "spec.json", "restore config.json"),
         _edit_config(architecture="pagctl_mlp")),
    Case("config-num-classes-differs", ["attack", "run", "--limit", "5"],
         ("model.safetensors", "size mismatch", "different runs"), _edit_config(num_classes=7)),
    Case("unreadable-config", ["attack", "run", "--limit", "5"],
         ("config.json", "unreadable", "restore config.json"),
         lambda env: (env.copy_run() / "config.json").write_text("{nope")),
    Case("run-without-weights", ["attack", "run", "--limit", "5"],
         ("no model.safetensors", "train or resume"), _remove("model.safetensors")),
    Case("run-without-spec", ["attack", "run", "--limit", "5"],
         ("no spec.json", "not a pagctl run folder"), _remove("spec.json")),
    Case("undecodable-spec", ["attack", "run", "--limit", "5"],
         ("spec.json", "unreadable"),
         lambda env: (env.copy_run() / "spec.json").write_bytes(b"\xff\xfe{")),
    Case("invalid-spec", ["compare", "run"], ("spec.json", "invalid spec"),
         lambda env: (env.copy_run() / "spec.json").write_text('{"version": 1}')),
    # compare
    Case("compare-missing-run", ["compare", "nowhere"], ("nowhere", "no spec.json")),
]


def test_enough_bad_input_cases() -> None:
    assert len(BAD_INPUT) >= 22
    assert len({c.id for c in BAD_INPUT}) == len(BAD_INPUT)


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c.id for c in BAD_INPUT])
def test_bad_input(case: Case, run: RunCLI, workdir: Path, monkeypatch: pytest.MonkeyPatch,
                   request: pytest.FixtureRequest) -> None:
    if case.prepare is not None:
        case.prepare(Env(workdir, monkeypatch, lambda: request.getfixturevalue("trained_run")))
    before = _snapshot(workdir)

    code, out, err = run(*case.argv)

    assert "Traceback" not in out + err
    assert code == 2, f"exit {code}; stderr:\n{err}"
    lines = err.splitlines()
    assert len(lines) == case.lines, f"expected {case.lines} line(s) on stderr:\n{err}"
    assert all(line.startswith("error: ") for line in lines), err
    for needle in case.needles:
        assert needle.lower() in err.lower(), f"{needle!r} not in:\n{err}"
    assert _snapshot(workdir) == before, "a failed command created or changed files"


# ---------------------------------------------------------------------------------------
# help, import cost, spec listing


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["attack", "--help"],
                                  ["compare", "--help"], ["plugins", "--help"]],
                         ids=lambda a: " ".join(a))
def test_help_exits_zero(argv: list[str], run: RunCLI) -> None:
    code, out, err = run(*argv)
    assert code == 0, err
    assert "Usage" in out
    assert "Traceback" not in out + err


def test_no_arguments_shows_help(run: RunCLI) -> None:
    code, out, err = run()
    assert "Usage" in out + err
    assert "Traceback" not in out + err
    assert code in (0, 2)


def test_version(run: RunCLI) -> None:
    from pagctl import __version__

    code, out, _ = run("--version")
    assert code == 0
    assert out.strip() == f"pagctl {__version__}"


def test_import_does_not_load_torch() -> None:
    code = ("import sys, pagctl, pagctl.cli\n"
            "heavy = [m for m in ('torch', 'timm', 'torchvision') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_list_shows_every_builtin(run: RunCLI) -> None:
    from pagctl.spec import builtin_spec_names

    names = builtin_spec_names()
    assert "digits-vanilla" in names
    code, out, err = run("train", "--list")
    assert code == 0, err
    listed = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert listed == names


def test_schema_is_json(run: RunCLI) -> None:
    code, out, err = run("train", "--schema")
    assert code == 0, err
    schema = json.loads(out)  # the JSON Schema itself, for editors: never an envelope
    assert "records" not in schema and schema["type"] == "object"
    assert {"model", "data", "train", "target_gradients", "eval"} <= set(schema["properties"])


def test_dry_run_creates_nothing(run: RunCLI, workdir: Path) -> None:
    code, out, err = run("train", "digits-pag-nn", "--dry-run", "-q")
    assert code == 0, err
    assert "valid" in out and "nearest_neighbor" in out
    assert list(workdir.iterdir()) == []


def test_dry_run_json_says_what_training_would_build(run: RunCLI, workdir: Path) -> None:
    code, out, err = run("train", "digits-pag-nn", "--dry-run", "-q", "--format", "json")
    assert code == 0, err
    [summary] = envelope_records(out, "train")
    assert summary["valid"] and summary["pag"] and summary["source"] == "nearest_neighbor"
    assert (summary["train_images"], summary["test_images"]) == (1437, 360)
    assert list(workdir.iterdir()) == []


def test_run_files_get_the_usual_file_mode(trained_run: Path) -> None:
    """Every file of a run folder, safetensors included, is created as open() would."""
    modes = {p.name: p.stat().st_mode & 0o777 for p in trained_run.iterdir()}
    assert len(set(modes.values())) == 1, modes


@pytest.mark.parametrize("name", ["2024", "yes", "null", "no", "1e3", "~x"])
def test_out_and_data_dir_are_paths_as_typed(run: RunCLI, workdir: Path, name: str) -> None:
    """--out and --data-dir are paths, never YAML: "2024", "yes", "null" are folder names."""
    code, out, err = run("train", "digits-vanilla", "--out", name, "--data-dir", name,
                         "--dry-run", "-q", "--set", "train.epochs=1")
    assert code == 0, err
    assert f"│ run folder   │ {name} " in out
    from pagctl.spec import load_spec

    spec = load_spec("digits-vanilla", [], {"out_dir": Path(name), "data.root": Path(name)})
    assert spec.run_dir == Path(name) and spec.data.root == Path(name)


def test_out_2024_writes_2024(run: RunCLI, workdir: Path) -> None:
    code, out, err = run("train", "digits-vanilla", "--out", "2024", "--set", "train.epochs=1",
                         "--set", "eval.limit=20", "-q", "--format", "json")
    assert code == 0, err
    assert [r["run_dir"] for r in envelope_records(out, "train")] == ["2024"]
    assert (workdir / "2024" / "model.safetensors").is_file()
    assert json.loads((workdir / "2024" / "spec.json").read_text())["out_dir"] == "2024"
    # the folder given back as SPEC resumes in place: its name is a path too
    code, out, err = run("train", "2024", "--resume", "-q", "--format", "json")
    assert code == 0, err
    assert [r["run_dir"] for r in envelope_records(out, "train")] == ["2024"]


def test_bank_data_dir_is_a_path_as_typed(run: RunCLI, workdir: Path) -> None:
    code, out, err = run("bank", "class_mean", "--spec", "digits-pag-cm", "--out",
                         "b.safetensors", "--data-dir", "no", "--format", "json", "-q")
    assert code == 0, err
    assert [r["num_images"] for r in envelope_records(out, "bank")] == [1437]


# ---------------------------------------------------------------------------------------
# a real run, attacked and compared


def test_train_writes_run_folder(trained: tuple[Path, int, str, str]) -> None:
    run_dir, code, out, err = trained
    assert code == 0, err
    assert "Traceback" not in out + err
    [summary] = envelope_records(out, "train")  # results on stdout, logs on stderr
    assert summary["run_dir"] == str(run_dir) and summary["epoch"] == 1
    names = {p.name for p in run_dir.iterdir()}
    assert names == set(RUN_FILES) - {BEST_MODEL_FILE}, f"unexpected files: {sorted(names)}"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["train_epoch"]
    assert records[0]["n_test"] == 40
    assert json.loads((run_dir / "spec.json").read_text())["name"] == "digits-vanilla"
    assert json.loads((run_dir / "config.json").read_text())["architecture"] == \
        "pagctl_small_cnn"


def test_attack_json_appends_metrics(run: RunCLI, trained_run: Path, tmp_path: Path) -> None:
    run_dir = _copy_run(trained_run, tmp_path / "run")
    before = (run_dir / "metrics.jsonl").read_text().splitlines()

    code, out, err = run("attack", run_dir, "--attack", "pgd_l2", "--param", "eps=0.5",
                         "--param", "steps=5", "--limit", "30", "--format", "json")

    assert code == 0, err
    [rec] = envelope_records(out, "attack")
    assert rec["kind"] == "attack" and rec["attack"] == "pgd_l2"
    assert rec["n"] == 30
    assert rec["params"]["eps"] == 0.5 and rec["params"]["steps"] == 5
    assert 0.0 <= rec["robust_accuracy"] <= rec["clean_accuracy"] <= 1.0
    after = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert after[: len(before)] == before and len(after) == len(before) + 1
    assert json.loads(after[-1]) == rec


def test_attack_eps_as_fraction(run: RunCLI, trained_run: Path, tmp_path: Path) -> None:
    run_dir = _copy_run(trained_run, tmp_path / "run")
    code, out, err = run("attack", run_dir, "--attack", "pgd_linf", "--param", "eps=8/255",
                         "--param", "steps=1", "--limit", "5", "--format", "json")
    assert code == 0, err
    [rec] = envelope_records(out, "attack")
    assert rec["params"]["eps"] == pytest.approx(8 / 255, rel=1e-12)
    assert rec["max_linf"] <= 8 / 255 + 1e-6


def test_attack_table(run: RunCLI, trained_run: Path, tmp_path: Path) -> None:
    run_dir = _copy_run(trained_run, tmp_path / "run")
    code, out, err = run("attack", run_dir, "--attack", "fgsm", "--limit", "5")
    assert code == 0, err
    assert "robust accuracy" in out and "clean accuracy" in out


def test_attack_report_fields(run: RunCLI, trained_run: Path, tmp_path: Path) -> None:
    run_dir = _copy_run(trained_run, tmp_path / "run")
    code, out, err = run("attack", run_dir, "--attack", "pgd_l2", "--param", "steps=5",
                         "--limit", "40", "--probe-size", "20", "--format", "json")
    assert code == 0, err
    [rec] = envelope_records(out, "attack")
    lo, hi = rec["robust_interval"]
    assert lo <= rec["robust_accuracy"] <= hi and lo >= 0 and hi <= 1
    assert rec["subset"]["count"] == 40 and len(rec["subset"]["indices_sha256"]) == 16
    assert rec["seed"] == 0 and rec["nan_count"] == 0
    assert 0.0 <= rec["pixel_min"] <= rec["pixel_max"] <= 1.0
    assert [s["name"] for s in rec["stages"]] == ["pgd_l2"]
    stage = rec["stages"][0]
    assert stage["attacked"] == rec["clean_correct"]
    assert stage["broke"] == rec["clean_correct"] - rec["robust_correct"]
    assert stage["forwards"] >= 5 * stage["attacked"]
    assert stage["backwards"] >= 5 * stage["attacked"]
    assert set(rec["reliability"]) == {"reliable", "reasons", "probes"}
    assert rec["reliability"]["probes"]["zero_gradient_fraction"] == 0.0
    assert len(rec["per_example"]["robust"]) == 2 * ((40 + 7) // 8)


def test_attack_sweep_plot_and_images(run: RunCLI, trained_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run_dir = _copy_run(trained_run, tmp_path / "run")
    (tmp_path / "idx.txt").write_text("\n".join(str(i) for i in range(100, 140)))
    code, out, err = run("attack", run_dir, "--attack", "pgd_l2", "--param", "steps=5",
                         "--eps-sweep", "0.25,1/2,2", "--indices", tmp_path / "idx.txt",
                         "--plot", tmp_path / "curve.pdf", "--dpi", "100", "--save-images",
                         tmp_path / "grid.png", "--no-probes", "--format", "json")
    assert code == 0, err
    recs = envelope_records(out, "attack")
    assert [r["eps"] for r in recs] == [0.25, 0.5, 2.0]
    assert all(r["subset"]["first"] == 100 and r["n"] == 40 for r in recs)
    assert recs[2]["robust_accuracy"] <= recs[0]["robust_accuracy"]
    assert (tmp_path / "curve.pdf").read_bytes()[:5] == b"%PDF-"
    for name in ("grid.png", "grid-classes.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, name
    # --dpi 100 reaches the images too: the 3-column grid is 5 inches wide
    assert 400 < int.from_bytes((tmp_path / "grid.png").read_bytes()[16:20], "big") <= 500
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["eps"] for x in lines[-3:]] == [0.25, 0.5, 2.0]


def test_attack_no_record_and_strict(run: RunCLI, trained_run: Path, tmp_path: Path) -> None:
    """--no-record leaves metrics.jsonl as it was; --strict exits 3 on an unreliable verdict
    (a 1-step PGD, which the stronger-attack probe beats), and without it the same result
    exits 0 and is recorded; --strict without the probes is refused."""
    run_dir = _copy_run(trained_run, tmp_path / "run")
    before = (run_dir / "metrics.jsonl").read_bytes()
    weak = ["attack", run_dir, "--attack", "pgd_l2", "--param", "steps=1", "--param", "eps=1",
            "--limit", "60", "--probe-size", "60", "--format", "json"]
    code, out, err = run(*weak, "--no-record", "--strict")
    assert code == 3, err
    [rec] = envelope_records(out, "attack")
    assert rec["reliability"]["reliable"] is False
    assert "not recorded (--no-record)" in err and "strict: the reliability verdict" in err
    assert (run_dir / "metrics.jsonl").read_bytes() == before
    code, out, err = run(*weak)  # without --strict: exit 0, recorded
    assert code == 0, err
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["n"] == 60
    code, out, err = run("attack", run_dir, "--attack", "pgd_l2", "--param", "steps=1",
                         "--strict", "--no-probes")
    assert code == 2 and "--strict" in err and "--no-probes" in err


def test_an_eps_that_holds_the_whole_pixel_box_is_warned_about_or_refused(
        run: RunCLI, trained_run: Path, tmp_path: Path) -> None:
    """An L∞ eps of 8 (meant as 8/255) is warned about in one stderr line and still runs;
    with --strict it is refused: one line naming --param eps with eps=8/255, exit 2,
    nothing recorded. A normal eps is not warned about."""
    run_dir = _copy_run(trained_run, tmp_path / "run")
    metrics = run_dir / "metrics.jsonl"
    before = metrics.read_bytes()
    argv = ["attack", run_dir, "--attack", "pgd_linf", "--param", "steps=1", "--limit", "8",
            "--probe-size", "8", "--format", "json", "--no-progress"]
    code, out, err = run(*argv, "--param", "eps=8", "--strict")
    assert code == 2 and out == ""
    [line] = err.strip().splitlines()
    assert line.startswith("error: --param eps: 8 is an L∞ radius >= 1") and "eps=8/255" in line
    assert metrics.read_bytes() == before
    code, out, err = run(*argv, "--param", "eps=8")
    assert code == 0, err
    [warning] = [x for x in err.splitlines() if x.startswith("warning:")]
    assert warning.startswith("warning: --param eps: 8 is an L∞ radius >= 1")
    assert json.loads(metrics.read_text().splitlines()[-1])["eps"] == 8
    code, out, err = run(*argv, "--param", "eps=8/255", "--strict", "--no-record")
    assert code in (0, 3) and "warning" not in err and "L∞ radius" not in err


def test_attack_exports(run: RunCLI, trained_run: Path, tmp_path: Path) -> None:
    """--export writes per-example and per-class CSVs and a RobustBench-style JSON that agree
    with the record; --save-adversarial writes points whose broken ones really are
    misclassified, inside the budget."""
    import csv

    import torch
    from safetensors.torch import load_file

    from pagctl.checkpoint import load_run
    from pagctl.stats import unpack_bits

    run_dir = _copy_run(trained_run, tmp_path / "run")
    code, out, err = run("attack", run_dir, "--attack", "pgd_linf", "--param", "eps=8/255",
                         "--param", "steps=5", "--limit", "40", "--no-probes", "--format",
                         "json", "--export", tmp_path / "ex", "--save-adversarial",
                         tmp_path / "adv.safetensors")
    assert code == 0, err
    [rec] = envelope_records(out, "attack")
    stem = tmp_path / "ex" / f"pgd_linf-linf-eps{8 / 255:.6g}"
    rows = list(csv.DictReader((stem.parent / (stem.name + ".per-example.csv")).open()))
    robust = unpack_bits(rec["per_example"]["robust"], 40).tolist()
    assert [int(r["robust_correct"]) for r in rows] == [int(b) for b in robust]
    assert [int(r["index"]) for r in rows] == list(range(40))
    classes = list(csv.DictReader((stem.parent / (stem.name + ".per-class.csv")).open()))
    assert sum(int(c["robust_correct"]) for c in classes) == rec["robust_correct"]
    entry = json.loads((stem.parent / (stem.name + ".robustbench.json")).read_text())
    assert entry["eps"] == "8/255" and entry["threat_model"] == "Linf" and entry["n"] == 40
    assert entry["robust_acc"] == f"{100 * rec['robust_accuracy']:.2f}"
    saved = load_file(str(tmp_path / "adv.safetensors"))
    assert saved["x_adv"].shape == saved["x"].shape == (40, 1, 8, 8)
    assert float((saved["x_adv"] - saved["x"]).abs().max()) <= 8 / 255 + 1e-6
    model = load_run(run_dir).model
    with torch.no_grad():
        wrong = model(saved["x_adv"]).argmax(1) != saved["y"]
    broken = (saved["clean_correct"] == 1) & (saved["robust_correct"] == 0)
    assert bool(wrong[broken].all()) and int(saved["robust_correct"].sum()) == rec[
        "robust_correct"]
    code, _, err = run("attack", run_dir, "--save-adversarial", tmp_path / "adv.pt")
    assert code == 2 and "--save-adversarial" in err
    (tmp_path / "folder.safetensors").mkdir()
    code, _, err = run("attack", run_dir, "--save-adversarial", tmp_path / "folder.safetensors")
    assert code == 2 and "--save-adversarial" in err and "is a folder" in err


def test_align_score_no_record(run: RunCLI, trained_run: Path, tmp_path: Path) -> None:
    run_dir = _copy_run(trained_run, tmp_path / "run")
    before = (run_dir / "metrics.jsonl").read_bytes()
    code, out, err = run("align-score", run_dir, "--limit", "20", "--no-record",
                         "--format", "json")
    assert code == 0, err
    [rec] = envelope_records(out, "align-score")
    assert rec["kind"] == "align" and "not recorded" in err
    assert (run_dir / "metrics.jsonl").read_bytes() == before


def test_attack_state_resumes_and_rejects_another_evaluation(
    run: RunCLI, trained_run: Path, tmp_path: Path,
) -> None:
    run_dir = _copy_run(trained_run, tmp_path / "run")
    state = tmp_path / "aa.state"
    argv = ["attack", run_dir, "--attack", "autoattack", "--param", "eps=0.5", "--param",
            "norm=l2", "--param", "steps=5", "--param", "square_queries=20", "--limit", "30",
            "--batch-size", "10", "--no-probes", "--format", "json", "--state", state]
    code, out, err = run(*argv)
    assert code == 0, err
    [first] = envelope_records(out, "attack")
    assert state.exists()
    code, out, err = run(*argv)  # a finished state answers again, identically
    assert code == 0, err
    [again] = envelope_records(out, "attack")
    assert again["per_example"] == first["per_example"]
    assert again["stages"] == first["stages"]
    code, out, err = run(*[a if a != "eps=0.5" else "eps=0.25" for a in argv])
    assert code == 2 and str(state) in err and "another evaluation (its params" in err


def test_attack_shards_merge_into_the_unsharded_result(
    run: RunCLI, trained_run: Path, tmp_path: Path,
) -> None:
    """Two shards run as independent jobs, then --merge-shards: the record equals the
    unsharded command's (seconds aside); shards record nothing; a missing shard is refused."""
    run_dir = _copy_run(trained_run, tmp_path / "run")
    argv = ["attack", run_dir, "--attack", "autoattack", "--param", "eps=0.5", "--param",
            "norm=l2", "--param", "steps=5", "--param", "square_queries=20", "--limit", "30",
            "--batch-size", "10", "--probe-size", "10", "--format", "json"]
    code, out, err = run(*argv, "--no-record")
    assert code == 0, err
    [whole] = envelope_records(out, "attack")
    before = (run_dir / "metrics.jsonl").read_text()
    code, out, err = run(*argv, "--merge-shards", "2")
    assert code == 2 and "shard 0/2 of this evaluation has not run" in err
    assert "--shard 0/2" in err and "Traceback" not in err
    for i in range(2):
        code, out, err = run(*argv, "--shard", f"{i}/2")
        assert code == 0, err
        assert out == "" and f"shard {i}/2 done" in err and "--merge-shards 2" in err
    assert (run_dir / "metrics.jsonl").read_text() == before  # shards record nothing
    assert len(list((run_dir / "shards").iterdir())) == 2
    code, out, err = run(*argv, "--merge-shards", "2")
    assert code == 0, err
    [merged] = envelope_records(out, "attack")
    drop = {"seconds", "stages"}
    assert {k: v for k, v in merged.items() if k not in drop} == \
        {k: v for k, v in whole.items() if k not in drop}
    assert [dict(s, seconds=0) for s in merged["stages"]] == \
        [dict(s, seconds=0) for s in whole["stages"]]
    after = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(after[-1]) == merged  # the merge records like an unsharded run
    code, out, err = run(*argv, "--seed", "1",
                         "--merge-shards", "2")
    assert code == 2 and "has not run" in err  # another seed is another evaluation


def _torchrun_two(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node 2 -m pagctl ARGV --shard torchrun`` (gloo,
    one thread per rank), checked to exit 0."""
    import os

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PAGCTL_DISABLE_PLUGIN_AUTOLOAD="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         "2", "-m", "pagctl", *argv, "--shard", "torchrun"],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=300,
        stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_attack_shards_under_torchrun_merge_on_rank_0(
    run: RunCLI, trained_run: Path, tmp_path: Path,
) -> None:
    """``torchrun --nproc-per-node 2 -m pagctl attack ... --shard torchrun`` (gloo, CPU):
    each rank runs its shard, rank 0 merges and prints the one result, equal to the
    unsharded command's but for the seconds."""

    run_dir = _copy_run(trained_run, tmp_path / "run")
    argv = ["attack", str(run_dir), "--attack", "autoattack", "--param", "eps=0.5",
            "--param", "norm=l2", "--param", "steps=5", "--param", "square_queries=20",
            "--limit", "30", "--batch-size", "10", "--probe-size", "10", "--format", "json",
            "--no-record", "--no-progress"]
    code, out, err = run(*argv)
    assert code == 0, err
    [whole] = envelope_records(out, "attack")
    proc = _torchrun_two(argv, tmp_path)
    [merged] = envelope_records(proc.stdout, "attack")  # one result: rank 0's
    drop = {"seconds", "stages"}
    assert {k: v for k, v in merged.items() if k not in drop} == \
        {k: v for k, v in whole.items() if k not in drop}
    assert [dict(s, seconds=0) for s in merged["stages"]] == \
        [dict(s, seconds=0) for s in whole["stages"]]
    assert len(list((run_dir / "shards").iterdir())) == 2


def test_attack_shard_torchrun_outside_torchrun_is_refused(
    run: RunCLI, trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    code, _, err = run("attack", tmp_path / "nowhere", "--shard", "torchrun")
    assert code == 2 and "--shard torchrun" in err and "torchrun --nproc-per-node" in err
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    code, _, err = run("attack", tmp_path / "nowhere", "--shard", "torchrun")
    assert code == 2 and "RANK 2 of WORLD_SIZE 2" in err


def test_several_runs_are_attacked_and_scored_in_turn(
    run: RunCLI, trained_run: Path, tmp_path: Path,
) -> None:
    """attack and align-score over two run folders: one envelope with a record per run
    (each naming its run), each run's metrics.jsonl receiving its own record, the same as
    the single-run command's; --plot draws one curve per run."""
    a, b = _copy_run(trained_run, tmp_path / "a"), _copy_run(trained_run, tmp_path / "b")
    argv = ["--attack", "fgsm", "--param", "eps=0.1", "--limit", "30", "--no-probes",
            "--format", "json", "--no-progress"]
    code, out, err = run("attack", a, b, *argv, "--eps-sweep", "0.05,0.1", "--plot",
                         tmp_path / "curves.png")
    assert code == 0, err
    records = envelope_records(out, "attack")
    assert [r["run"] for r in records] == [str(a), str(a), str(b), str(b)]
    assert "run 2/2" in err
    for folder in (a, b):
        saved = [json.loads(line) for line in
                 (folder / "metrics.jsonl").read_text().splitlines()][-2:]
        assert saved == [{k: v for k, v in r.items() if k != "run"}
                         for r in records if r["run"] == str(folder)]
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    code, out, err = run("attack", a, *argv, "--no-record")
    assert code == 0, err
    [single] = envelope_records(out, "attack")
    assert "run" not in single and single["per_example"] == records[1]["per_example"]
    code, out, err = run("align-score", a, b, "--source", "class_mean", "-k", "2", "--limit",
                         "20", "--format", "json", "--no-progress", "--no-record")
    assert code == 0, err
    scores = envelope_records(out, "align-score")
    assert [r["run"] for r in scores] == [str(a), str(b)]
    assert scores[0]["mean"] == scores[1]["mean"]  # two copies of one run


def test_align_score_shards_merge_into_the_unsharded_result(
    run: RunCLI, trained_run: Path, tmp_path: Path,
) -> None:
    """align-score in two shards run as independent jobs, then --merge-shards: the record
    equals the unsharded command's but for the seconds; shards record nothing; a missing
    shard, or a merge of another seed's shards, is refused with one line."""
    run_dir = _copy_run(trained_run, tmp_path / "run")
    argv = ["align-score", run_dir, "--source", "class_mean", "-k", "3", "--limit", "50",
            "--batch-size", "12", "--format", "json", "--no-progress"]
    code, out, err = run(*argv, "--no-record")
    assert code == 0, err
    [whole] = envelope_records(out, "align-score")
    before = (run_dir / "metrics.jsonl").read_text()
    code, out, err = run(*argv, "--merge-shards", "2")
    assert code == 2 and "shard 0/2 of this score has not run" in err
    assert "Traceback" not in err
    for i in range(2):
        code, out, err = run(*argv, "--shard", f"{i}/2")
        assert code == 0, err
        assert out == "" and f"shard {i}/2 done" in err and "--merge-shards 2" in err
    assert (run_dir / "metrics.jsonl").read_text() == before  # shards record nothing
    assert len(list((run_dir / "shards").glob("align-class_mean-*"))) == 2
    code, out, err = run(*argv, "--merge-shards", "2")
    assert code == 0, err
    [merged] = envelope_records(out, "align-score")
    assert merged["seconds"] > 0
    assert dict(merged, seconds=0) == dict(whole, seconds=0)
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1]) == merged
    code, out, err = run(*argv, "--seed", "1", "--merge-shards", "2")
    assert code == 2 and "has not run" in err  # another seed is another score
    code, out, err = run(*argv, "--shard", "2/2")
    assert code == 2 and "--shard" in err and "0 <= I < N" in err
    code, out, err = run(*argv, "--shard", "0/2", "--save-images", tmp_path / "g.png")
    assert code == 2 and "--save-images" in err and "--merge-shards" in err


@pytest.mark.usefixtures("one_thread")  # as the ranks (OMP_NUM_THREADS=1): the same rounding
def test_align_score_shards_under_torchrun_merge_on_rank_0(
    run: RunCLI, trained_run: Path, tmp_path: Path,
) -> None:
    """``torchrun --nproc-per-node 2 -m pagctl align-score ... --shard torchrun`` (gloo,
    CPU): rank 0 prints the one result, equal to the unsharded command's but for the
    seconds."""

    run_dir = _copy_run(trained_run, tmp_path / "run")
    argv = ["align-score", str(run_dir), "--source", "class_mean", "-k", "3", "--limit", "40",
            "--batch-size", "10", "--format", "json", "--no-progress", "--no-record"]
    code, out, err = run(*argv)
    assert code == 0, err
    [whole] = envelope_records(out, "align-score")
    proc = _torchrun_two(argv, tmp_path)
    [merged] = envelope_records(proc.stdout, "align-score")  # one result: rank 0's
    assert dict(merged, seconds=0) == dict(whole, seconds=0)
    assert len(list((run_dir / "shards").iterdir())) == 2


@pytest.mark.usefixtures("sigint_default")
def test_attack_ctrl_c_keeps_state_and_resume_equals_an_uninterrupted_run(
    run: RunCLI, trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os
    import signal

    from pagctl.robustness.state import AttackState

    run_dir = _copy_run(trained_run, tmp_path / "run")
    argv = ["attack", run_dir, "--attack", "autoattack", "--param", "eps=0.5", "--param",
            "norm=l2", "--param", "steps=5", "--param", "square_queries=20", "--limit", "40",
            "--batch-size", "10", "--no-probes", "--format", "json"]
    code, out, err = run(*argv)
    assert code == 0, err
    [whole] = envelope_records(out, "attack")

    state = tmp_path / "aa.state"
    original = AttackState.save
    saves = {"n": 0}

    def save_then_ctrl_c(self: object, path: Path) -> None:
        original(self, path)  # type: ignore[arg-type]
        saves["n"] += 1
        if saves["n"] == 6:  # mid-way through the second stage
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(AttackState, "save", save_then_ctrl_c)
    code, out, err = run(*argv, "--state", state)
    assert code == 130 and "run the same command again to resume" in err and out == ""
    monkeypatch.setattr(AttackState, "save", original)
    code, out, err = run(*argv, "--state", state)
    assert code == 0, err
    [resumed] = envelope_records(out, "attack")
    assert resumed["per_example"] == whole["per_example"]
    assert [(s["attacked"], s["broke"]) for s in resumed["stages"]] == \
        [(s["attacked"], s["broke"]) for s in whole["stages"]]


def test_align_score_json_and_images(run: RunCLI, trained_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run_dir = _copy_run(trained_run, tmp_path / "run")
    code, out, err = run("align-score", run_dir, "--source", "class_mean", "--limit", "30",
                         "-k", "3", "--save-images", tmp_path / "g.png", "--format", "json")
    assert code == 0, err
    [rec] = envelope_records(out, "align-score")
    assert rec["kind"] == "align" and rec["source"] == "class_mean" and rec["n"] == 30
    assert rec["classes_per_image"] == 3 and rec["source_params"] == {"scale": 1.0}
    lo, hi = rec["interval"]
    assert -1 <= lo <= rec["mean"] <= hi <= 1 and 0 <= rec["fraction_positive"] <= 1
    assert set(rec["per_target"]) == {"true", "other"}
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last == rec
    code, out, err = run("align-score", run_dir, "--source", "nearest_neighbor", "--limit",
                         "20")
    assert code == 0, err
    assert "mean cosine" in out and "95% CI" in out


def test_train_score_and_bank(run: RunCLI, workdir: Path) -> None:
    code, out, err = run("train-score", "score-toy", "--set", "train.steps=5", "--set",
                         "sample.per_class=4", "--out", "score", "-q", "--format", "json")
    assert code == 0, err
    [summary] = envelope_records(out, "train-score")
    assert summary["steps"] == 5 and (workdir / "score" / "model.safetensors").exists()
    code, out, err = run("bank", "class_mean", "--spec", "digits-pag-cm", "--out",
                         "cm.safetensors", "-q", "--format", "json")
    assert code == 0, err
    [info] = envelope_records(out, "bank")
    assert info["num_images"] == 1437 and info["num_classes"] == 10
    assert info["source"] == "class_mean" and (workdir / "cm.safetensors").exists()
    code, out, err = run("bank", "class_mean", "--spec", "digits-pag-cm", "--out",
                         "cm.safetensors", "-q")
    assert code == 2 and ("--overwrite" in err or "--resume" in err), err


def test_bank_of_the_specs_own_source_starts_from_its_params(run: RunCLI, workdir: Path
                                                             ) -> None:
    """`pagctl bank S --spec X` with S = X's source takes X's params (then --param on top);
    another source starts from its defaults."""
    spec = ["--spec", "toy-pag-score", "--set", "data.toy_train_size=50",
            "--set", "target_gradients.params.noise=0.05"]
    code, out, err = run("bank", "toy_score", *spec, "--out", "a.safetensors", "-q",
                         "--format", "json")
    assert code == 0, err
    [info] = envelope_records(out, "bank")
    assert info["params"]["noise"] == 0.05
    code, out, err = run("bank", "toy_score", *spec, "--param", "kind=conditional",
                         "--out", "b.safetensors", "-q", "--format", "json")
    assert code == 0, err
    [info] = envelope_records(out, "bank")
    params = info["params"]
    assert params["noise"] == 0.05 and params["kind"] == "conditional"
    code, out, err = run("bank", "class_mean", *spec, "--out", "c.safetensors", "-q",
                         "--format", "json")
    assert code == 0, err
    [info] = envelope_records(out, "bank")
    assert "noise" not in info["params"]


def test_compare_reads_no_weights(run: RunCLI, trained_run: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors
    import safetensors.torch

    from pagctl import checkpoint

    calls: list[str] = []

    def forbidden(name: str) -> Callable[..., object]:
        def fail(*args: object, **kwargs: object) -> object:
            calls.append(name)
            raise AssertionError(f"compare called {name}")

        return fail

    monkeypatch.setattr(safetensors.torch, "load_file", forbidden("load_file"))
    monkeypatch.setattr(safetensors, "safe_open", forbidden("safe_open"))
    monkeypatch.setattr(checkpoint, "load_run", forbidden("load_run"))

    code, out, err = run("compare", trained_run, trained_run, "--format", "json")

    assert code == 0, err
    assert calls == []
    [comparison] = envelope_records(out, "compare")
    rows = comparison["runs"]
    assert len(rows) == 2
    assert all(r["name"] == "digits-vanilla" and r["epochs"] == 1 for r in rows)


def test_compare_table(run: RunCLI, trained_run: Path) -> None:
    code, out, err = run("compare", trained_run)
    assert code == 0, err
    assert "digits-vanilla" in out


def test_resume_finished_run_by_folder(run: RunCLI, trained_run: Path, workdir: Path) -> None:
    """The spec in the folder has out_dir null; resuming it by path must still match."""
    run_dir = _copy_run(trained_run, workdir / "elsewhere" / "run")
    weights = (run_dir / "model.safetensors").read_bytes()
    code, _, err = run("train", run_dir, "--resume", "-q")
    assert code == 0, err
    assert (run_dir / "model.safetensors").read_bytes() == weights


def test_overwrite_replaces_run_folder(run: RunCLI, trained_run: Path, workdir: Path) -> None:
    run_dir = _copy_run(trained_run, workdir / "run")
    old_weights = (run_dir / "model.safetensors").read_bytes()

    code, _, err = run("train", "toy-vanilla", "--out", "run", "--overwrite", "-q",
                       "--set", "train.epochs=1", "--set", "data.toy_train_size=128",
                       "--set", "data.toy_test_size=32", "--set", "eval.attack=null",
                       "--set", "eval.align_source=null")

    assert code == 0, err
    assert json.loads((run_dir / "spec.json").read_text())["name"] == "toy-vanilla"
    records = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 1 and json.loads(records[0])["kind"] == "train_epoch"
    assert (run_dir / "model.safetensors").read_bytes() != old_weights
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------
# exit codes of runtime failures and interruptions


def test_interrupted_train_exits_130(run: RunCLI, workdir: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from pagctl import train as train_mod

    def interrupted(spec: object, **kwargs: object) -> train_mod.TrainResult:
        return train_mod.TrainResult(Path("runs/x"), 3, True)

    monkeypatch.setattr(train_mod, "train", interrupted)
    code, _, err = run(*TRAIN)
    assert code == 130
    assert "pagctl train runs/x --resume" in " ".join(err.split())  # rich may wrap lines


def test_runtime_failure_is_one_line_exit_1(run: RunCLI, workdir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from pagctl import train as train_mod

    def boom(spec: object, **kwargs: object) -> None:
        raise RuntimeError("loss became nan\nsecond line")

    monkeypatch.setattr(train_mod, "train", boom)
    code, out, err = run(*TRAIN)
    assert code == 1
    assert "Traceback" not in out + err
    assert err.splitlines() == ["error: RuntimeError: loss became nan (rerun with --verbose "
                                "for the traceback)"]
    with pytest.raises(RuntimeError, match="loss became nan"):
        cli.main(["--verbose", *TRAIN])


def test_ctrl_c_exits_130(run: RunCLI, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pagctl import train as train_mod

    def ctrl_c(spec: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train", ctrl_c)
    code, out, err = run(*TRAIN)
    assert code == 130
    assert "Traceback" not in out + err


# ---------------------------------------------------------------------------------------
# plugins


BUILTINS = [("source", "pagctl.target_gradients", name)
            for name in registry.BUILTIN_TARGET_GRADIENTS] + \
    [("attack", "pagctl.attacks", name) for name in registry.BUILTIN_ATTACKS]


def test_plugins_table_lists_every_builtin(run: RunCLI) -> None:
    code, out, err = run("plugins")
    assert code == 0, err
    rows = {tuple(line.split()[:2]): line.split() for line in out.splitlines()[1:]}
    for kind, _, name in BUILTINS:
        cells = rows.get((kind, name))
        assert cells is not None, f"{kind} {name} missing:\n{out}"
        assert cells[2] == "pagctl" and cells[4] == "ok", cells


def test_plugins_json(run: RunCLI) -> None:
    code, out, err = run("plugins", "--format", "json")
    assert code == 0, err
    rows = envelope_records(out, "plugins")
    status = {(r["group"], r["name"]): r["status"] for r in rows}
    for _, group, name in BUILTINS:
        assert status.get((group, name)) == "ok", (group, name, status)


def test_every_commands_json_is_one_envelope_whatever_its_flags(
        run: RunCLI, trained_run: Path, workdir: Path) -> None:
    """`--format json` prints the same envelope for every command (docs/cli.md, "JSON
    output"): kind the command as typed, records always a list: one per eps with
    --eps-sweep (also of one eps) and one without; one per plugin listed, and one for
    `plugins NAME`; one for the rest."""
    from pagctl.cli import SHORT_HELP
    from pagctl.cli.common import ENVELOPE_RECORDS

    run_dir = _copy_run(trained_run, workdir / "run")
    attack = ["attack", run_dir, "--attack", "fgsm", "--limit", "8", "--no-probes",
              "--no-progress", "--no-record"]
    plugin_count = sum(len(reg.info()) for reg in registry.REGISTRIES.values())
    cases: list[tuple[str, list[str | Path], int]] = [
        ("train", ["train", "digits-vanilla", "--dry-run", "-q"], 1),
        ("train", ["train", "toy-vanilla", "--out", "toy", "-q", "--set", "train.epochs=1",
                   "--set", "data.toy_train_size=128", "--set", "data.toy_test_size=16",
                   "--set", "eval.attack=null", "--set", "eval.align_source=null"], 1),
        ("train-score", ["train-score", "score-toy", "--set", "train.steps=2", "--set",
                         "sample.per_class=2", "--out", "score", "-q"], 1),
        ("attack", attack, 1),
        ("attack", [*attack, "--eps-sweep", "0.1"], 1),
        ("attack", [*attack, "--eps-sweep", "0.1,0.2"], 2),
        ("bank", ["bank", "class_mean", "--spec", "digits-pag-cm", "--out", "b.safetensors",
                  "-q"], 1),
        ("align-score", ["align-score", run_dir, "--limit", "8", "--no-record",
                         "--no-progress"], 1),
        ("compare", ["compare", run_dir, run_dir], 1),
        ("import", ["import", "digits-vanilla", "--checkpoint", run_dir / "model.safetensors",
                    "--out", "imported"], 1),
        ("plugins", ["plugins"], plugin_count),
        ("plugins", ["plugins", "pgd_l2"], 1),
    ]
    for kind, argv, count in cases:
        code, out, err = run(*argv, "--format", "json")
        assert code == 0, (argv, err)
        records = envelope_records(out, kind)
        assert len(records) == count, (argv, len(records))
        assert json.loads(out)["records"] == records and out.count("\n}\n") == 1
    assert plugin_count > 1
    sweep = envelope_records(run(*attack, "--eps-sweep", "0.1,0.2", "--format", "json")[1],
                             "attack")
    assert [(r["kind"], r["eps"]) for r in sweep] == [("attack", 0.1), ("attack", 0.2)]
    # benchmark prints attack's table; its machine-readable result is its export
    assert {kind for kind, _, _ in cases} == set(ENVELOPE_RECORDS) == \
        set(SHORT_HELP) - {"benchmark"}


def test_command_list_is_one_line_each_at_80_columns_and_names_no_repository_paths() -> None:
    """`pagctl --help` lists each command on one line of an 80-column terminal; no help text
    points to a repository path (docs/…), which an installed wheel does not ship."""
    import typer

    from pagctl.cli import SHORT_HELP, app

    group = typer.main.get_command(app)
    commands = getattr(group, "commands", {})
    assert set(commands) == set(SHORT_HELP)
    for name, cmd in commands.items():
        assert len(SHORT_HELP[name]) <= 58 and cmd.short_help == SHORT_HELP[name]
        texts = [cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
        assert not any("docs/" in t for t in texts), name
    assert "docs/" not in (group.help or "")


def test_progress_off_a_terminal_is_periodic_plain_lines(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """In a log (stderr not a terminal) the bar becomes plain lines: one per interval and
    one at the end, with count, share, elapsed, ETA and the info text."""
    import time

    from pagctl import progress

    monkeypatch.setenv(progress.PROGRESS_SECONDS_ENV, "0.05")
    assert not progress.stderr_console.is_terminal  # it writes to the captured sys.stderr
    with progress.ProgressBar("attack", 4) as bar:
        for i in range(4):
            time.sleep(0.06)
            bar.update(advance=1, info=f"robust {i}/4")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("attack:")]
    assert len(lines) >= 4 and lines[-1].startswith("attack: 4/4 (100%) elapsed 0:00:00 eta")
    assert lines[-1].endswith("robust 3/4") and "━" not in "".join(lines)
    with progress.ProgressBar("quiet", 3, enabled=False) as bar:
        bar.update(advance=3)
    assert "quiet" not in capsys.readouterr().err


def test_mixed_precision_evaluation_is_opt_in_and_marked(
    run: RunCLI, trained_run: Path, tmp_path: Path,
) -> None:
    """--precision bfloat16 runs the model's forward under bfloat16 autocast: the result
    says so on screen and in the record, compare keeps it apart from float32's, and a
    float32 record carries no mark."""
    run_dir = _copy_run(trained_run, tmp_path / "run")
    argv = ["attack", str(run_dir), "--attack", "pgd_l2", "--param", "eps=0.5", "--param",
            "steps=3", "--limit", "40", "--no-probes", "--no-progress"]
    code, out, err = run(*argv, "--format", "json")
    assert code == 0, err
    [fp32] = envelope_records(out, "attack")
    code, out, err = run(*argv, "--format", "json", "--precision", "bfloat16")
    assert code == 0, err
    [bf16] = envelope_records(out, "attack")
    assert "precision" not in fp32 and bf16["precision"] == "bfloat16"
    assert bf16["n"] == fp32["n"] == 40
    assert abs(bf16["clean_accuracy"] - fp32["clean_accuracy"]) <= 0.1  # bf16 rounding
    assert bf16["max_l2"] <= 0.5 * (1 + 1e-6)  # the budget is checked in float32
    code, out, _ = run(*argv, "--precision", "bfloat16", "--no-record")
    assert code == 0 and "bfloat16 autocast (opt-in, not float32)" in out
    recorded = read_metrics(run_dir).of(AttackRecord)
    assert [r.precision for r in recorded] == [None, "bfloat16"]
    code, out, _ = run("compare", str(run_dir), "--format", "csv")
    assert code == 0 and "pgd_l2 (bfloat16)" in out
    code, _, err = run(*argv, "--precision", "float16")
    assert code == 2 and err.splitlines() == [
        "error: --precision: 'float16' is not one of float32, bfloat16"]
