from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import CliResult

from pagctl import checkpoint
from pagctl.data.augment import Augmented
from pagctl.records import TrainEpochRecord
from pagctl.spec import load_spec
from pagctl.train import lr_at, pag_weight_at, train

FAST = ["train.epochs=2", "data.batch_size=128", "eval.attack=null", "eval.limit=40"]


def test_step_schedule_matches_the_official_code() -> None:
    t = load_spec("cifar10-rn18-pag-nn").train  # lr 0.01, 100 epochs
    lrs = {e + 1: lr_at(t, e, 0, 10) for e in range(100)}
    assert lrs[1] == lrs[49] == pytest.approx(0.01)
    assert lrs[50] == lrs[74] == pytest.approx(0.001)
    assert lrs[75] == lrs[99] == pytest.approx(1e-4)
    assert lrs[100] == pytest.approx(1e-5)


def test_cosine_schedule_and_warmup() -> None:
    t = load_spec("digits-pag-nn").train
    assert lr_at(t, 0, 0, 10) == pytest.approx(t.lr)
    assert lr_at(t, t.epochs // 2, 0, 10) == pytest.approx(t.lr / 2)
    assert lr_at(t, t.epochs - 1, 9, 10) < 1e-3 * t.lr
    vit = load_spec("cifar10-vit-pag-nn").train
    assert pag_weight_at(vit, 49) == pytest.approx(20.0)  # epoch 50 (1-based): warm-up
    assert pag_weight_at(vit, 50) == pytest.approx(30.0)


def test_augmentation_crops_flips_and_is_differentiated_through() -> None:
    x = torch.rand(3, 2, 5, 5, requires_grad=True)
    offsets = torch.tensor([[0, 0], [2, 2], [4, 1]])
    flips = torch.tensor([False, True, False])
    seen: list[torch.Tensor] = []

    def record(z: torch.Tensor) -> torch.Tensor:
        seen.append(z)
        return z.sum(dim=(1, 2, 3))

    out = Augmented(record, offsets, flips, padding=2)(x)  # type: ignore[arg-type]
    z = seen[0]
    padded = torch.nn.functional.pad(x.detach(), (2, 2, 2, 2))
    assert torch.equal(z[0].detach(), padded[0, :, 0:5, 0:5])
    assert torch.equal(z[1].detach(), padded[1, :, 2:7, 2:7].flip(-1))
    assert torch.equal(z[2].detach(), padded[2, :, 4:9, 1:6])
    (grad,) = torch.autograd.grad(out.sum(), x)
    # a centred crop keeps every pixel; a shifted one drops the pixels cropped away
    assert torch.equal(grad[1], torch.ones_like(grad[1]))
    assert grad[0].sum() == 2 * 3 * 3 and grad[2].sum() == 2 * 3 * 4


def test_augmentation_of_repeated_rows_follows_each_image() -> None:
    """The "repeat" gradient method's batch (each image K times in a row): every copy gets
    its image's crop and flip, the same as augmenting the images and then repeating them."""
    x = torch.rand(3, 2, 5, 5)
    offsets = torch.tensor([[0, 0], [2, 2], [4, 1]])
    flips = torch.tensor([False, True, True])
    seen: list[torch.Tensor] = []

    def record(z: torch.Tensor) -> torch.Tensor:
        seen.append(z)
        return z.sum(dim=(1, 2, 3))

    Augmented(record, offsets, flips, padding=2)(x)  # type: ignore[arg-type]
    Augmented(record, offsets, flips, padding=2)(x.repeat_interleave(4, 0))  # type: ignore[arg-type]
    assert torch.equal(seen[1], seen[0].repeat_interleave(4, 0))
    with pytest.raises(ValueError, match="drawn for 3 images"):
        Augmented(record, offsets, flips, padding=2)(torch.rand(4, 2, 5, 5))  # type: ignore[arg-type]


def test_every_grad_method_trains(workdir: Path) -> None:
    """train.grad_method reaches the step: the three methods give the same first-epoch
    loss on a model in train mode up to BatchNorm's train-mode coupling."""
    losses = {}
    for method in ("loop", "repeat", "batched"):
        spec = load_spec("digits-pag-cm", [*FAST, "train.epochs=1", "train.classes_per_image=2",
                                           f"train.grad_method={method}", f"out_dir={method}"])
        result = train(spec, device="cpu", progress=False)
        losses[method] = result.last["loss"]
    assert losses["batched"] == pytest.approx(losses["loop"], rel=1e-4)
    assert losses["repeat"] == pytest.approx(losses["loop"], rel=0.05)


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load_tensors(run_dir / checkpoint.MODEL_FILE)


def _epoch_records(run_dir: Path) -> list[dict[str, object]]:
    return [{k: v for k, v in r.to_json().items() if not k.endswith("_seconds")}
            for r in checkpoint.read_metrics(run_dir).of(TrainEpochRecord)]


@pytest.mark.usefixtures("sigint_default")
def test_ctrl_c_saves_state_and_resume_is_bit_for_bit(workdir: Path) -> None:
    spec_a = load_spec("digits-pag-cm", [*FAST, "out_dir=a"])
    result = train(spec_a, device="cpu", progress=False)
    assert not result.interrupted

    spec_b = load_spec("digits-pag-cm", [*FAST, "out_dir=b"])

    def interrupt(epoch: int, step: int) -> None:
        if (epoch, step) == (0, 4):
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, handled by the loop

    stopped = train(spec_b, device="cpu", progress=False, on_step=interrupt)
    assert stopped.interrupted and stopped.epochs_done == 0
    meta = json.loads((workdir / "b" / checkpoint.STATE_META_FILE).read_text())
    assert (meta["epoch"], meta["step"]) == (0, 5)
    assert not (workdir / "b" / checkpoint.MODEL_FILE).exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    resumed = train(spec_b, device="cpu", progress=False, resume=True)
    assert not resumed.interrupted and resumed.epochs_done == 2
    wa, wb = _final_weights(workdir / "a"), _final_weights(workdir / "b")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    assert _epoch_records(workdir / "a") == _epoch_records(workdir / "b")
    assert not [p for p in (workdir / "b").iterdir() if p.name.startswith(".")]


def test_a_run_started_with_sigint_ignored_keeps_ignoring_it(workdir: Path) -> None:
    """Under nohup or a background job SIGINT is ignored: pagctl does not take it over."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        spec = load_spec("digits-vanilla", [*FAST, "out_dir=r", "train.epochs=1"])

        def interrupt(epoch: int, step: int) -> None:
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)

        result = train(spec, device="cpu", progress=False, on_step=interrupt)
        assert not result.interrupted and result.epochs_done == 1
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("sigint_default")
def test_resume_after_a_finished_epoch_drops_duplicated_metrics(workdir: Path) -> None:
    spec = load_spec("digits-vanilla", [*FAST, "out_dir=r"])

    def interrupt(epoch: int, step: int) -> None:
        if (epoch, step) == (0, 10):  # the last step of epoch 1 (11 steps)
            os.kill(os.getpid(), signal.SIGINT)

    first = train(spec, device="cpu", progress=False, on_step=interrupt)
    assert first.interrupted and first.epochs_done == 1
    train(spec, device="cpu", progress=False, resume=True)
    assert [r["epoch"] for r in _epoch_records(workdir / "r")] == [1, 2]


@pytest.mark.usefixtures("sigint_default")
def test_the_run_train_seconds_sum_its_epochs_across_a_resume(workdir: Path) -> None:
    """The result's (and the summary's) train_seconds is the whole run's: the epochs'
    train_seconds summed, the epochs before a stop included; each epoch record keeps its
    own, which the summary shows as epoch_train_seconds."""
    spec = load_spec("digits-vanilla", [*FAST, "out_dir=r"])

    def interrupt(epoch: int, step: int) -> None:
        if (epoch, step) == (1, 3):  # within epoch 2
            os.kill(os.getpid(), signal.SIGINT)

    stopped = train(spec, device="cpu", progress=False, on_step=interrupt)
    assert stopped.interrupted and stopped.epochs_done == 1
    [first] = checkpoint.read_metrics(workdir / "r").of(TrainEpochRecord)
    assert first.train_seconds is not None
    assert stopped.train_seconds > first.train_seconds  # and epoch 2's first steps

    resumed = train(spec, device="cpu", progress=False, resume=True)
    epochs = checkpoint.read_metrics(workdir / "r").of(TrainEpochRecord)
    seconds = [r.train_seconds or 0.0 for r in epochs]
    assert [r.epoch for r in epochs] == [1, 2] and all(s > 0 for s in seconds)
    assert resumed.train_seconds == pytest.approx(sum(seconds))
    summary = resumed.summary()
    assert summary["train_seconds"] == pytest.approx(sum(seconds))
    assert summary["epoch_train_seconds"] == pytest.approx(seconds[-1])
    assert summary["epoch"] == 2


def test_resume_refuses_a_different_spec(workdir: Path) -> None:
    from pagctl.errors import SpecError

    spec = load_spec("digits-vanilla", [*FAST, "train.epochs=1", "out_dir=r"])
    train(spec, device="cpu", progress=False)
    other = load_spec("digits-vanilla", [*FAST, "train.epochs=1", "train.lr=0.1", "out_dir=r"])
    with pytest.raises(SpecError, match="differs"):
        train(other, device="cpu", progress=False, resume=True)


def test_pag_step_is_really_optimised(workdir: Path) -> None:
    """With lambda > 0 the PAG term falls over training and is recorded per epoch."""
    spec = load_spec("digits-pag-nn", ["train.epochs=3", "eval.attack=null", "eval.limit=40",
                                       "out_dir=p"])
    train(spec, device="cpu", progress=False)
    recs = _epoch_records(workdir / "p")
    pag = [float(r["pag"]) for r in recs]  # type: ignore[arg-type]
    assert pag[-1] < pag[0]
    assert all(r["alignment"] is not None for r in recs)
    assert recs[-1]["pag_weight"] == 1.0


def test_run_folder_loads_with_plain_timm_and_safetensors(workdir: Path) -> None:
    spec = load_spec("digits-vanilla", [*FAST, "train.epochs=1", "model.arch=test_resnet",
                                        "out_dir=t"])
    train(spec, device="cpu", progress=False)
    run = checkpoint.load_run(workdir / "t")
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.save(x, workdir / "x.pt")
    with torch.no_grad():
        expected = run.model(x)
    script = textwrap.dedent(f"""
        import json, sys, timm, torch
        torch.set_num_threads({torch.get_num_threads()})  # the same reduction order
        from safetensors.torch import load_file
        assert not any(m.startswith("pagctl") for m in sys.modules)
        cfg = json.load(open("t/config.json"))
        model = timm.create_model(cfg["architecture"], num_classes=cfg["num_classes"],
                                  **cfg["model_args"])
        model.load_state_dict(load_file("t/model.safetensors"))
        mean = torch.tensor(cfg["pretrained_cfg"]["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(cfg["pretrained_cfg"]["std"]).view(1, -1, 1, 1)
        x = torch.load("x.pt")
        with torch.no_grad():
            torch.save(model.eval()((x - mean) / std), "logits.pt")
        assert not any(m.startswith("pagctl") for m in sys.modules)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=workdir,
                   env={**os.environ, "PYTHONPATH": ""})
    assert torch.equal(torch.load(workdir / "logits.pt"), expected)


@pytest.mark.slow
def test_pag_training_makes_the_digits_model_more_robust(workdir: Path) -> None:
    """The calibration recipe: PAG (nearest neighbour, lambda 1) beats vanilla under
    PGD-L2 eps 0.5 at the same clean accuracy (measured: +20 pp or more)."""
    from pagctl import registry
    from pagctl.data import load_data
    from pagctl.protocols import BuildContext
    from pagctl.robustness.engine import run_attack

    robust = {}
    for name in ("digits-vanilla", "digits-pag-nn"):
        spec = load_spec(name, ["eval.attack=null", "eval.every=30"])
        train(spec, device="cpu", progress=False)
        run = checkpoint.load_run(spec.run_dir)
        bundle = load_data(spec.data)
        ctx = BuildContext(10, bundle.input_shape, torch.device("cpu"), 0)
        params = registry.attacks.validate_params("pgd_l2", {"eps": 0.5, "steps": 50}, "p")
        attack = registry.attacks.get("pgd_l2")(params, ctx)
        rep = run_attack(run.model, attack, bundle.test, torch.arange(len(bundle.test)),
                         name="pgd_l2", params=params)
        assert rep.clean_accuracy > 0.95
        robust[name] = rep.robust_accuracy
    assert robust["digits-pag-nn"] > robust["digits-vanilla"] + 0.10, robust


def test_the_default_monitor_is_cheap_and_the_full_one_is_a_flag_away(
        workdir: Path, pagctl: Callable[..., CliResult]) -> None:
    """digits-vanilla monitors 100 test images every 5 epochs (and the last); --full-monitor:
    every image, every epoch. (What each costs is measured, not tested: docs/specs.md.)"""
    argv = ["train", "digits-vanilla", "--set", "train.epochs=6", "--device", "cpu", "-q",
            "--format", "json"]
    assert pagctl(*argv, "--out", "cheap").code == 0
    records = _epoch_records(workdir / "cheap")
    assert [r.get("n_test") for r in records] == [None, None, None, None, 100, 100]
    assert pagctl(*argv, "--out", "full", "--full-monitor").code == 0
    assert [r.get("n_test") for r in _epoch_records(workdir / "full")] == [360] * 6


def test_bfloat16_autocast_trains_through_the_pag_double_backward(workdir: Path) -> None:
    """train.amp on the CPU: the K input gradients and their double backward run under
    bfloat16 autocast; the step stays finite and learns like float32 (the same first-epoch
    loss to bfloat16's precision), and the weights stay float32."""
    base = [*FAST, "train.epochs=1", "eval.attack=null"]
    fp32 = train(load_spec("digits-pag-nn", [*base, "out_dir=f"]), device="cpu",
                 progress=False)
    bf16 = train(load_spec("digits-pag-nn", [*base, "out_dir=b", "train.amp=true"]),
                 device="cpu", progress=False)
    assert bf16.last["loss"] == pytest.approx(fp32.last["loss"], rel=0.05)
    assert bf16.last["pag"] == pytest.approx(fp32.last["pag"], rel=0.05)
    assert bf16.last["train_accuracy"] > 0.5
    weights = _final_weights(workdir / "b")
    assert {w.dtype for w in weights.values() if w.is_floating_point()} == {torch.float32}
