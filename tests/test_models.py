"""pagctl.models: registered architectures, the normalisation wrapper, build errors, and the
timm-compatible round trip (config.json + safetensors)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pagctl.errors import CheckpointError, SpecError, UntrustedCodeError
from pagctl.models import NormalizedModel, build_model, rebuild_from_config, timm_config
from pagctl.spec import ModelSpec
from pagctl.trust import CodeTrust

PAGCTL_ARCHS = ("pagctl_small_cnn", "pagctl_cifar_resnet18", "pagctl_mlp")
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Bitwise comparisons across processes need the same kernel schedule."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_registered_names_create_with_plain_timm() -> None:
    assert set(PAGCTL_ARCHS) <= set(timm.list_models("pagctl_*"))
    for name in PAGCTL_ARCHS:
        net: Any = timm.create_model(name, num_classes=3)
        assert net.pretrained_cfg["architecture"] == name and net.default_cfg is not None
        assert not any(getattr(m, "inplace", False) for m in net.modules()), name


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 96, 96)])
def test_small_cnn_output_shapes(shape: tuple[int, int, int]) -> None:
    net: Any = timm.create_model("pagctl_small_cnn", num_classes=7, in_chans=shape[0])
    assert net(torch.rand(2, *shape)).shape == (2, 7)
    narrow: Any = timm.create_model("pagctl_small_cnn", num_classes=7, in_chans=shape[0], width=0.5)
    assert narrow.num_features == 64 and narrow(torch.rand(2, *shape)).shape == (2, 7)


def test_cifar_resnet18_size_and_timm_interface() -> None:
    net: Any = timm.create_model("pagctl_cifar_resnet18", num_classes=10)
    params = sum(p.numel() for p in net.parameters())
    assert params == pytest.approx(11.17e6, rel=0.01)
    assert params == 11_173_962  # the official code's model
    x = torch.rand(2, 3, 32, 32)
    features = net.forward_features(x)
    assert features.shape == (2, 512, 4, 4) and net.num_features == 512
    assert net.forward_head(features, pre_logits=True).shape == (2, 512)
    assert net(x).shape == (2, 10) and net.num_classes == 10
    net.reset_classifier(5)
    assert net(x).shape == (2, 5) and net.get_classifier().out_features == 5
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert net.forward_features(torch.rand(1, 3, 28, 28)).shape == (1, 512, 4, 4)
    assert timm.create_model("pagctl_cifar_resnet18", in_chans=1)(
        torch.rand(1, 1, 28, 28)).shape == (1, 10)


def test_mlp_for_toy_points() -> None:
    net: Any = timm.create_model("pagctl_mlp", num_classes=2)
    assert net(torch.rand(5, 2, 1, 1)).shape == (5, 2)
    assert [m.out_features for m in net.modules() if isinstance(m, nn.Linear)] == [64, 64, 2]
    wide: Any = timm.create_model("pagctl_mlp", num_classes=10, in_chans=1, in_features=64,
                             hidden=16)
    assert wide(torch.rand(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("name", PAGCTL_ARCHS)
def test_no_pretrained_weights(name: str) -> None:
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model(name, pretrained=True)


def test_double_backprop_and_torch_func() -> None:
    net: Any = timm.create_model("pagctl_small_cnn", num_classes=4, in_chans=1).eval()
    x = torch.rand(3, 1, 8, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(net(x).log_softmax(1)[:, 0].sum(), x, create_graph=True)
    grad.square().sum().backward()  # type: ignore[no-untyped-call]  # second order through BatchNorm and ReLU
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)

    def log_p0(sample: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = net(sample[None]).log_softmax(1)[0, 0]
        return out

    per_sample = torch.func.vmap(torch.func.grad(log_p0))(x.detach())
    torch.testing.assert_close(per_sample, grad.detach(), rtol=1e-5, atol=1e-6)


def test_attention_made_twice_differentiable_computes_the_same() -> None:
    """timm's ViT with its fused attention switched off (what PAG training does): the same
    outputs and input gradients as fused, and a second backward through the input gradient
    that reaches every parameter."""
    from pagctl.models import twice_differentiable

    torch.manual_seed(0)
    net: Any = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=2, in_chans=1,
                                 embed_dim=16, depth=2, num_heads=2, num_classes=4).eval()
    x = torch.rand(3, 1, 8, 8, requires_grad=True)
    fused_out = net(x)
    (fused_grad,) = torch.autograd.grad(fused_out.log_softmax(1)[:, 0].sum(), x)
    assert twice_differentiable(net) == 2  # one attention module per block
    assert twice_differentiable(net) == 0  # already off
    out = net(x)
    torch.testing.assert_close(out, fused_out, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(out.log_softmax(1)[:, 0].sum(), x, create_graph=True)
    torch.testing.assert_close(grad, fused_grad, rtol=1e-4, atol=1e-6)
    grad.square().sum().backward()  # type: ignore[no-untyped-call]
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all())
               for p in net.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["digits-mlp-pag-nn", "digits-vit-pag-nn",
                                  "digits-resnet-pag-nn", "digits-vit-vanilla"])
def test_architecture_family_specs_build(name: str) -> None:
    """The digits architecture families build on the digits data; PAG switches a ViT's fused
    attention off, a vanilla run keeps it."""
    from pagctl.build import setup
    from pagctl.spec import load_spec

    s = setup(load_spec(name), torch.device("cpu"))
    assert s.bundle.input_shape == (1, 8, 8)
    assert s.model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    fused = [m.fused_attn for m in s.model.modules() if hasattr(m, "fused_attn")]
    assert bool(fused) == ("vit" in name)
    assert not any(fused) if s.pag_active else all(fused)


def test_normalized_model_applies_mean_and_std() -> None:
    model = NormalizedModel(nn.Identity(), (0.5, 0.25), (0.5, 2.0))
    x = torch.rand(4, 2, 3, 3)
    expected = torch.stack([(x[:, 0] - 0.5) / 0.5, (x[:, 1] - 0.25) / 2.0], dim=1)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-7)
    assert model.mean.shape == (1, 2, 1, 1) and model.std.shape == (1, 2, 1, 1)
    assert list(model.state_dict()) == []  # mean/std travel in config.json, not the weights
    assert model.to(torch.float64).mean.dtype == torch.float64
    with pytest.raises(ValueError):
        NormalizedModel(nn.Identity(), (0.5,), (0.0,))


def test_build_model_uses_data_shape_and_defaults() -> None:
    model = build_model(ModelSpec(arch="pagctl_small_cnn", kwargs={"width": 0.25}),
                        num_classes=10, in_chans=1, default_mean=(0.3054,),
                        default_std=(0.3761,))
    assert isinstance(model, NormalizedModel) and model.num_classes == 10
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    assert model.mean.item() == pytest.approx(0.3054)
    own = build_model(ModelSpec(arch="pagctl_mlp", mean=(0.5, 0.5), std=(1.0, 1.0)),
                      num_classes=2, in_chans=2, default_mean=(0.25, 0.5),
                      default_std=(0.2, 0.2))
    assert own.mean.flatten().tolist() == [0.5, 0.5]


def _spec_error(spec: ModelSpec, in_chans: int = 3) -> str:
    with pytest.raises(SpecError) as err:
        build_model(spec, num_classes=10, in_chans=in_chans, default_mean=CIFAR_MEAN,
                    default_std=CIFAR_STD, trust=CodeTrust.of(True))
    message = str(err.value)
    assert "\n" not in message
    return message


def test_build_model_errors_are_one_line_spec_errors() -> None:
    assert _spec_error(ModelSpec(arch="resnet81")) == (
        "model.arch: unknown architecture 'resnet81'; did you mean 'resnet18'? (a timm "
        "name, a model provider listed by 'pagctl plugins', or package.module:factory)")
    assert "did you mean 'pagctl_small_cnn'" in _spec_error(ModelSpec(arch="pagctl_smal_cnn"))
    assert _spec_error(ModelSpec(arch="pagctl_small_cnn", kwargs={"depth": 3})).startswith(
        "model.kwargs.depth: not an argument of pagctl_small_cnn")
    assert _spec_error(ModelSpec(arch="pagctl_small_cnn", kwargs={"pretrained": True})) \
        .startswith("model.kwargs.pretrained: ")  # the network, not asked for
    assert _spec_error(ModelSpec(arch="pagctl_mlp", kwargs={"num_classes": 3})).startswith(
        "model.kwargs.num_classes: ")
    assert _spec_error(ModelSpec(arch="pagctl_small_cnn", mean=(0.5,))).startswith(
        "model.mean: has 1 entries but the data has 3 channel(s)")
    assert _spec_error(ModelSpec(arch="pagctl_small_cnn"), in_chans=1).startswith(
        "model.mean: has 3 entries (the dataset's default)")
    assert _spec_error(ModelSpec(arch="pagctl_small_cnn", mean=(0.5,), std=(1.0, 1.0)),
                       in_chans=1).startswith("model.std: ")


def _trained_like(model: NormalizedModel, shape: tuple[int, ...]) -> NormalizedModel:
    """Move BatchNorm statistics away from their initial values, then switch to eval."""
    gen = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(8, *shape, generator=gen))
    return model.eval()


def _save_run(folder: Path, model: NormalizedModel, spec: ModelSpec, num_classes: int,
              shape: tuple[int, int, int]) -> torch.Tensor:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(model.net.state_dict(), str(folder / "model.safetensors"))
    cfg = timm_config(model, spec, num_classes, shape[0], shape, class_names=None)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits: torch.Tensor = model(x)
    save_file({"x": x, "logits": logits}, str(folder / "io.safetensors"))
    return logits


_PLAIN_TIMM = textwrap.dedent("""
    import json, sys
    import timm, torch
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    folder = sys.argv[1]
    cfg = json.load(open(folder + "/config.json"))
    io = load_file(folder + "/io.safetensors")
    net = timm.create_model(cfg["architecture"], num_classes=cfg["num_classes"],
                            **cfg["model_args"])
    net.load_state_dict(load_file(folder + "/model.safetensors"))
    net.eval()
    mean = torch.tensor(cfg["pretrained_cfg"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(cfg["pretrained_cfg"]["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        assert torch.equal(net((io["x"] - mean) / std), io["logits"]), "plain rebuild"
        local = timm.create_model("local-dir:" + folder, pretrained=True).eval()
        assert torch.equal(local((io["x"] - mean) / std), io["logits"]), "local-dir rebuild"
    assert not any(m == "pagctl" or m.startswith("pagctl.") for m in sys.modules)
    print("rebuilt without pagctl")
""")


def test_plain_timm_rebuilds_a_run_without_pagctl(tmp_path: Path) -> None:
    spec = ModelSpec(arch="test_resnet")
    model = build_model(spec, num_classes=5, in_chans=3, default_mean=CIFAR_MEAN,
                        default_std=CIFAR_STD)
    _save_run(tmp_path, _trained_like(model, (3, 32, 32)), spec, 5, (3, 32, 32))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["pretrained_cfg"]["mean"] == list(CIFAR_MEAN)  # shortest float32 decimals
    assert cfg["model_args"] == {"in_chans": 3} and cfg["num_classes"] == 5
    result = subprocess.run([sys.executable, "-c", _PLAIN_TIMM, str(tmp_path)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rebuilt without pagctl" in result.stdout


@pytest.mark.parametrize(("arch", "kwargs", "shape", "num_classes"), [
    ("pagctl_small_cnn", {"width": 0.5}, (1, 8, 8), 10),
    ("pagctl_cifar_resnet18", {}, (3, 32, 32), 10),
    ("pagctl_mlp", {"hidden": 16}, (2, 1, 1), 2),
])
def test_pagctl_archs_round_trip(arch: str, kwargs: dict[str, object],
                                 shape: tuple[int, int, int], num_classes: int,
                                 tmp_path: Path) -> None:
    spec = ModelSpec(arch=arch, kwargs=kwargs)
    model = build_model(spec, num_classes=num_classes, in_chans=shape[0],
                        default_mean=(0.3,) * shape[0], default_std=(0.4,) * shape[0])
    logits = _save_run(tmp_path, _trained_like(model, shape), spec, num_classes, shape)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architecture"] == arch and cfg["model_args"] == {"in_chans": shape[0], **kwargs}
    assert cfg["pretrained_cfg"]["input_size"] == list(shape)
    io = load_file(str(tmp_path / "io.safetensors"))
    rebuilt = rebuild_from_config(cfg, load_file(str(tmp_path / "model.safetensors")))
    assert not rebuilt.training
    with torch.no_grad():
        assert torch.equal(rebuilt(io["x"]), logits)
        local = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
        assert torch.equal(local((io["x"] - rebuilt.mean) / rebuilt.std), logits)


def test_rebuild_from_config_errors(tmp_path: Path) -> None:
    spec = ModelSpec(arch="pagctl_mlp")
    model = build_model(spec, num_classes=2, in_chans=2, default_mean=(0.25, 0.5),
                        default_std=(0.2, 0.2))
    cfg = timm_config(model, spec, 2, 2, (2, 1, 1), class_names=("a", "b"))
    assert cfg["pretrained_cfg"]["label_names"] == ["a", "b"]
    weights = model.net.state_dict()
    with pytest.raises(CheckpointError, match="cannot rebuild pagctl_mlp"):
        rebuild_from_config({**cfg, "num_classes": 3}, weights)
    with pytest.raises(CheckpointError, match="malformed"):
        rebuild_from_config({"architecture": "pagctl_mlp"}, weights)
    with pytest.raises(CheckpointError, match="unknown architecture 'pagctl_mpl'"):
        rebuild_from_config({**cfg, "architecture": "pagctl_mpl"}, weights)


PLAIN_TORCH_MODULE = '''
import torch
from torch import nn


class Net(nn.Module):
    """A plain-torch classifier taking [0, 1] pixels (no timm, no pagctl)."""

    def __init__(self, hidden: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(),
                                  nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def make(num_classes: int, hidden: int = 16) -> nn.Module:
    return Net(hidden, num_classes)


NOT_A_MODEL = 3


def returns_a_number() -> int:
    return 3
'''


def test_an_import_path_builds_any_module_and_rebuilds_from_its_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``model.arch: module:factory`` builds a plain-torch model from the current folder; the
    factory gets num_classes (it names it) but not in_chans (it does not); the config
    round-trips through rebuild_from_config. Each import needs the user's trust
    (`pagctl.trust`), which names the callable or trusts everything."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plain_net_a.py").write_text(PLAIN_TORCH_MODULE)
    spec = ModelSpec(arch="plain_net_a:make", kwargs={"hidden": 8}, mean=(0.0,), std=(1.0,))
    with pytest.raises(UntrustedCodeError, match="'plain_net_a:make' names Python code"):
        build_model(spec, num_classes=10, in_chans=1, default_mean=(0.3,), default_std=(0.4,))
    with pytest.raises(UntrustedCodeError):
        build_model(spec, num_classes=10, in_chans=1, default_mean=(0.3,), default_std=(0.4,),
                    trust=CodeTrust.of(named=["plain_net_a:Net"]))
    assert "plain_net_a" not in sys.modules  # refused before anything was imported
    model = build_model(spec, num_classes=10, in_chans=1, default_mean=(0.3,),
                        default_std=(0.4,), trust=CodeTrust.of(named=["plain_net_a:make"]))
    net: Any = model.net
    assert type(net).__name__ == "Net" and net.body[1].out_features == 8
    cfg = timm_config(model, spec, 10, 1, (1, 8, 8))
    assert cfg["architecture"] == "plain_net_a:make"
    with pytest.raises(UntrustedCodeError, match="read from RUN; .* --trust-code"):
        rebuild_from_config(cfg, model.net.state_dict(), folder="RUN")
    again = rebuild_from_config(cfg, model.net.state_dict(), trust=CodeTrust.of(True))
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(again(x), model.eval()(x))
    # a class works as a factory too
    cls = build_model(ModelSpec(arch="plain_net_a:Net", kwargs={"classes": 10}),
                      num_classes=10, in_chans=1, default_mean=(0.0,), default_std=(1.0,),
                      trust=CodeTrust.of(True))
    assert cls(x).shape == (3, 10)


@pytest.mark.parametrize(("arch", "message"), [
    ("no_such_module_x:make", "cannot import 'no_such_module_x'"),
    ("plain_net_b:missing", "'plain_net_b' has no 'missing'"),
    ("plain_net_b:NOT_A_MODEL", "is not callable"),
    ("plain_net_b:returns_a_number", "returned int, not a torch.nn.Module"),
    ("plain_net_b:make", "model.kwargs.depth: not an argument"),
])
def test_import_path_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         arch: str, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plain_net_b.py").write_text(PLAIN_TORCH_MODULE)
    kwargs = {"depth": 3} if arch.endswith(":make") and "no_such" not in arch else {}
    got = _spec_error(ModelSpec(arch=arch, kwargs=kwargs, mean=(0.0,), std=(1.0,)), in_chans=1)
    assert message in got and got.startswith("model.")
