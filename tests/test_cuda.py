"""GPU paths (AMP, channels_last, device placement). Run with `pytest -m cuda` on a machine
with a CUDA GPU; skipped elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_input_gradients_match_cpu() -> None:
    import timm

    import pagctl.models  # noqa: F401  (registers the architectures)
    from pagctl.gradients import input_gradients

    torch.manual_seed(0)
    model = timm.create_model("pagctl_small_cnn", num_classes=10, in_chans=3).eval()
    x = torch.rand(8, 3, 32, 32)
    classes = torch.randint(0, 10, (8, 3))
    cpu = input_gradients(model, x, classes)
    gpu = input_gradients(model.cuda(), x.cuda(), classes.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("amp, channels_last", [(False, False), (True, True)])
def test_training_and_attack_on_cuda(workdir: Path, amp: bool, channels_last: bool) -> None:
    from pagctl import checkpoint, registry
    from pagctl.attack import run_attack
    from pagctl.data import load_data
    from pagctl.protocols import BuildContext
    from pagctl.spec import load_spec
    from pagctl.train import train

    spec = load_spec("digits-pag-nn", ["train.epochs=2", f"train.amp={amp}",
                                       f"train.channels_last={channels_last}", "out_dir=g"])
    result = train(spec, device="cuda", progress=False)
    assert result.last["clean_accuracy"] > 0.5 and -1 <= result.last["alignment"] <= 1
    run = checkpoint.load_run(workdir / "g", "cuda")
    bundle = load_data(spec.data)
    params = registry.attacks.validate_params("pgd_l2", {"eps": 0.5, "steps": 10}, "p")
    attack = registry.attacks.get("pgd_l2")(params, BuildContext(10, (1, 8, 8),
                                                                  torch.device("cuda"), 0))
    rep = run_attack(run.model, attack, bundle.test, torch.arange(100), name="pgd_l2",
                     params=params, device="cuda")
    assert rep.robust_accuracy <= rep.clean_accuracy and rep.max_l2 <= 0.5 * (1 + 1e-6)


@pytest.mark.parametrize("name", ["autoattack", "cw_l2", "fab", "square"])
def test_every_attack_runs_on_cuda_and_matches_cpu(name: str) -> None:
    """Same model, points and seeds on CPU and GPU: every output on the GPU, inside the
    budget, and robust accuracy within 2 points of the CPU's (kernels round differently)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from attack_kit import train_digits_mlp

    from pagctl import registry
    from pagctl.attack import run_attack
    from pagctl.data import TensorImageDataset
    from pagctl.protocols import BuildContext

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
                         name=name, params=params, device=device)
        assert rep.max_l2 <= 0.5 * (1 + 1e-6)
        results[device] = rep.robust_correct
    assert abs(results["cpu"] - results["cuda"]) <= 2, results
