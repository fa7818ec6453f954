"""GPU paths (AMP, channels_last, device placement). Run with `pytest -m cuda` on a machine
with a CUDA GPU; skipped elsewhere."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pagctl.evaluation.request import EvaluationRequest

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """Full float32 convolutions and matrix products (PyTorch lets cuDNN use TF32 by default,
    which changes gradients in the 4th digit), for comparisons with the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("method", ["loop", "batched", "repeat"])
def test_input_gradients_match_cpu(no_tf32: None, method: str) -> None:
    import timm

    import pagctl.models  # noqa: F401  (registers the architectures)
    from pagctl.gradients import input_gradients

    torch.manual_seed(0)
    model = timm.create_model("pagctl_small_cnn", num_classes=10, in_chans=3).eval()
    x = torch.rand(8, 3, 32, 32)
    classes = torch.randint(0, 10, (8, 3))
    cpu = input_gradients(model, x, classes)
    gpu = input_gradients(model.cuda(), x.cuda(), classes.cuda(),
                          method=method)  # type: ignore[arg-type]
    assert gpu.device.type == "cuda"
    scale = float(cpu.abs().max())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize("amp, channels_last, method",
                         [(False, False, "loop"), (True, True, "loop"), (True, True, "repeat")])
def test_training_and_attack_on_cuda(workdir: Path, amp: bool, channels_last: bool,
                                     method: str) -> None:
    from pagctl import checkpoint, registry
    from pagctl.data import load_data
    from pagctl.protocols import BuildContext
    from pagctl.robustness.engine import run_attack
    from pagctl.spec import load_spec
    from pagctl.train import train

    spec = load_spec("digits-pag-nn", ["train.epochs=2", f"train.amp={amp}",
                                       f"train.channels_last={channels_last}",
                                       f"train.grad_method={method}", "out_dir=g"])
    result = train(spec, device="cuda", progress=False)
    assert result.last["clean_accuracy"] > 0.5 and -1 <= result.last["alignment"] <= 1
    run = checkpoint.load_run(workdir / "g", "cuda")
    bundle = load_data(spec.data)
    params = registry.attacks.validate_params("pgd_l2", {"eps": 0.5, "steps": 10}, "p")
    attack = registry.attacks.get("pgd_l2")(params, BuildContext(10, (1, 8, 8),
                                                                  torch.device("cuda"), 0))
    rep = run_attack(run.model, attack, bundle.test, torch.arange(100), name="pgd_l2",
                     params=params, request=EvaluationRequest(device="cuda"))
    assert rep.robust_accuracy <= rep.clean_accuracy and rep.max_l2 <= 0.5 * (1 + 1e-6)


@pytest.mark.parametrize("name", ["autoattack", "cw_l2", "fab", "square"])
def test_every_attack_runs_on_cuda_and_matches_cpu(name: str) -> None:
    """Same model, points and seeds on CPU and GPU: every output on the GPU, inside the
    budget, and robust accuracy within 2 points of the CPU's (kernels round differently)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from attack_kit import train_digits_mlp

    from pagctl import registry
    from pagctl.data import TensorImageDataset
    from pagctl.protocols import BuildContext
    from pagctl.robustness.engine import run_attack

    model, x, y = train_digits_mlp(100)
    given = {"eps": 0.5} | ({"norm": "l2"} if name != "cw_l2" else {})
    if name == "autoattack":
        given |= {"steps": 20, "square_queries": 200}
    params = registry.attacks.validate_params(name, given, "p")
    results = {}
    for device in ("cpu", "cuda"):
        ctx = BuildContext(10, (1, 8, 8), torch.device(device), 0)
        attack = registry.attacks.instantiate(name, params, ctx, "p")
        rep = run_attack(model.to(device), attack, TensorImageDataset(x, y), torch.arange(100),
                         name=name, params=params, request=EvaluationRequest(device=device))
        assert rep.max_l2 <= 0.5 * (1 + 1e-6)
        results[device] = rep.robust_correct
    assert abs(results["cpu"] - results["cuda"]) <= 2, results


def test_score_model_trains_on_cuda_and_sbg_targets_match_cpu(workdir: Path, no_tf32: None) -> None:
    """A score model trained on the GPU (bfloat16 autocast) serves the same SBG targets on
    GPU and CPU, and a bank written on the GPU is served by `precomputed` on the GPU."""
    from pagctl.banks import write_bank
    from pagctl.score.spec import load_score_spec
    from pagctl.score.train import train_score
    from pagctl.target_gradients.precomputed import Precomputed
    from pagctl.target_gradients.sbg import SBG
    from pagctl.testing import small_context

    spec = load_score_spec("score-digits", ["model.width=8", "train.steps=30",
                                            "train.batch_size=64", "train.log_every=10",
                                            "train.save_every=30", "sample.steps=3",
                                            "sample.per_class=2", "train.amp=true",
                                            "out_dir=s"])
    result = train_score(spec, device="cuda", progress=False)
    assert not result.interrupted and result.steps_done == 30
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(6)
    classes = torch.tensor([[(i + 1) % 10, (i + 2) % 10] for i in range(6)])
    index = torch.arange(6)
    targets = {}
    for device in ("cpu", "cuda"):
        ctx = small_context(channels=1, size=8, classes=10, device=device)
        source = SBG(SBG.Params(run=workdir / "s"), ctx)
        out = source(x.to(device), labels.to(device), classes.to(device), index=index.to(device))
        assert out.device.type == device and torch.isfinite(out).all()
        targets[device] = out.cpu()
    torch.testing.assert_close(targets["cuda"], targets["cpu"], rtol=1e-3, atol=1e-3)

    ctx = small_context(channels=1, size=8, classes=10, device="cuda")
    sbg = SBG(SBG.Params(run=workdir / "s"), ctx)
    write_bank(sbg, ctx.train_set, workdir / "bank.safetensors", num_classes=10,
               dtype="float32", device="cuda", progress=False,
               data_fingerprint=ctx.data_fingerprint)
    bank = Precomputed(Precomputed.Params(path=workdir / "bank.safetensors"), ctx)
    picked = [ctx.train_set[i] for i in (0, 3, 7)]
    images = torch.stack([item[0] for item in picked]).cuda()
    labels3 = torch.tensor([item[1] for item in picked], device="cuda")
    idx = torch.tensor([0, 3, 7], device="cuda")
    cls = torch.tensor([[1, 2], [4, 5], [8, 9]], device="cuda")
    served = bank(images, labels3, cls, index=idx)
    assert served.device.type == "cuda" and served.shape == (3, 2, 1, 8, 8)
    torch.testing.assert_close(served, sbg(images, labels3, cls, index=idx), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize(("recipe", "amp"), [("digits-pgd-at-pag-nn", False),
                                             ("digits-trades-pag-nn", True)])
def test_adversarial_training_with_pag_on_cuda(workdir: Path, no_tf32: None, recipe: str,
                                               amp: bool) -> None:
    """Adversarial training + PAG on the GPU: one inner attack agrees with the CPU's (same
    seeded start, drawn on the CPU; sign steps may flip where a gradient entry is near 0),
    the cost accounting counts the CPU's passes per image for the same grad_method and
    measures every phase (the device is synchronised at phase changes), and both kept
    weights load on the GPU."""
    from pagctl import checkpoint
    from pagctl.checkpoint import read_metrics
    from pagctl.data import load_data
    from pagctl.models import build_model
    from pagctl.objectives import InnerAttack, step_seed
    from pagctl.records import TrainEpochRecord
    from pagctl.spec import load_spec
    from pagctl.train import train

    spec = load_spec(recipe, ["train.epochs=2", f"train.amp={amp}", "data.validation_size=100",
                              "eval.limit=100", "train.classes_per_image=2", "out_dir=g"])
    bundle = load_data(spec.data)
    x = torch.stack([bundle.test[i][0] for i in range(64)])
    y = torch.tensor([bundle.test[i][1] for i in range(64)])
    torch.manual_seed(0)
    model = build_model(spec.model, num_classes=10, in_chans=1, default_mean=(0.3,),
                        default_std=(0.4,), allow_download=False)
    seed = step_seed(0, 1, 2)
    out = {}
    for device in ("cpu", "cuda"):
        inner = InnerAttack.build(spec.train, bundle, torch.device(device))
        assert inner is not None
        m = model.to(device).train()
        out[device] = inner(m, m, x.to(device), y.to(device), seed)
        assert out[device].device.type == device
    differ = (out["cuda"].cpu() - out["cpu"]).abs() > 1e-4
    assert float(differ.float().mean()) < 0.02
    assert float((out["cuda"].cpu() - x).abs().max()) <= 0.1 + 1e-6

    result = train(spec, device="cuda", progress=False)
    assert not result.interrupted
    records = [r.to_json() for r in read_metrics(workdir / "g").of(TrainEpochRecord)]
    assert len(records) == 2 and records[-1]["n_val"] == 100
    for r in records:
        assert r["attack_seconds"] > 0 and r["pag_seconds"] > 0 and r["step_seconds"] > 0
    assert records[-1]["val_robust_accuracy"] is not None
    # grad_method auto is repeat on the GPU and loop on the CPU: count the same method
    on_cpu = load_spec(recipe, ["train.epochs=1", "data.validation_size=100", "eval.limit=20",
                                "train.classes_per_image=2", "train.grad_method=repeat",
                                "out_dir=c"])
    train(on_cpu, device="cpu", progress=False)
    cpu_record = [r.to_json() for r in read_metrics(workdir / "c").of(TrainEpochRecord)][-1]
    assert records[-1]["passes_per_image"] == cpu_record["passes_per_image"]
    for weights in ("last", "best"):
        run = checkpoint.load_run(workdir / "g", "cuda", weights=weights)
        assert next(run.model.parameters()).device.type == "cuda"
        assert run.weights == weights


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_data_parallel_training_on_two_gpus_follows_one(workdir: Path) -> None:
    """torchrun with 2 processes, one GPU each (NCCL), BatchNorm synchronised: the per-epoch
    records follow one GPU's closely (cuDNN's TF32 convolutions round more than the CPU, so
    the comparison is of the losses, not the weights)."""
    import json
    import os
    import subprocess
    import sys

    from pagctl import checkpoint
    from pagctl.records import TrainEpochRecord

    argv = ["train", "digits-pag-nn", "--device", "cuda", "-q", "--set", "train.epochs=2",
            "--set", "data.batch_size=128", "--set", "eval.attack=null"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    one = subprocess.run([sys.executable, "-m", "pagctl", *argv, "--out", "one"],
                         capture_output=True, text=True, cwd=workdir, env=env, check=False)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "pagctl", *argv, "--out", "two"],
                         capture_output=True, text=True, cwd=workdir, env=env, check=False)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "device cuda:0" in two.stderr and "3 BatchNorm layers synchronised" in two.stderr
    records = [[r.to_json() for r in checkpoint.read_metrics(workdir / name)
                .of(TrainEpochRecord)] for name in ("one", "two")]
    for a, b in zip(*records, strict=True):
        assert b["processes"] == 2
        for key in ("loss", "pag", "train_accuracy"):
            assert b[key] == pytest.approx(a[key], rel=1e-3), (key, json.dumps(b))
