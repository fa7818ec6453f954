"""Tests of the robust_teacher target-gradient source.

A real teacher run folder is trained once per module (digits, one epoch, a few seconds).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pagctl import registry
from pagctl.align import mean_alignment
from pagctl.checkpoint import load_run
from pagctl.data import DataBundle, load_data
from pagctl.errors import SpecError
from pagctl.losses import cosine_alignment
from pagctl.spec import PluginRef, load_spec
from pagctl.testing import check_target_gradient_source, small_context
from pagctl.train import train
from pydantic import ValidationError

from pagctl_example_target_gradients import RobustTeacher

pytestmark = pytest.mark.plugins

FAST = ["train.epochs=1", "data.batch_size=128", "eval.attack=null", "eval.limit=40",
        "eval.align_source=null"]


@pytest.fixture(scope="module", autouse=True)
def _hermetic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Caches in a temp folder; tiny tensors run fastest on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAGCTL_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "teacher"
    spec = load_spec("digits-vanilla", [*FAST, f"out_dir={out}"])
    train(spec, device="cpu", progress=False)
    return out


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return load_data(load_spec("digits-vanilla").data)


def build(teacher_dir: Path, **params: object) -> RobustTeacher:
    validated = RobustTeacher.Params.model_validate({"run": str(teacher_dir), **params})
    return RobustTeacher(validated, small_context(channels=1, size=8, classes=10))


def batch(digits: DataBundle, n: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.stack([digits.test[i][0] for i in range(n)])
    y = torch.tensor([int(digits.test[i][1]) for i in range(n)])
    g = torch.Generator().manual_seed(3)
    classes = torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(n)])
    return x, y, classes


def test_conforms(teacher_dir: Path) -> None:
    ctx = small_context(channels=1, size=8, classes=10)
    for normalize in (True, False):
        check_target_gradient_source(
            RobustTeacher, params={"run": str(teacher_dir), "normalize": normalize}, ctx=ctx)
    check_target_gradient_source(
        RobustTeacher, params={"run": str(teacher_dir), "chunk_size": 3}, ctx=ctx,
        classes_per_image=10)


def test_equals_autograd_and_finite_differences_of_the_teacher(
        teacher_dir: Path, digits: DataBundle) -> None:
    x, y, classes = batch(digits)
    teacher = load_run(teacher_dir).model.eval()
    raw = build(teacher_dir, normalize=False)(x, y, classes)
    unit = build(teacher_dir)(x, y, classes)
    assert raw.dtype == unit.dtype == torch.float32
    assert raw.shape == unit.shape == (12, 4, 1, 8, 8)

    # Full Jacobian of log softmax per image, by torch.func: a different code path.
    def log_probs(image: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(teacher(image.unsqueeze(0)), dim=1)[0]

    for i in range(len(x)):
        jac = torch.func.jacrev(log_probs)(x[i])  # (10, 1, 8, 8)
        expected = jac[classes[i]]
        torch.testing.assert_close(raw[i], expected, rtol=1e-5, atol=1e-6)
        norms = expected.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
        torch.testing.assert_close(unit[i], expected / norms, rtol=1e-5, atol=1e-6)
    norms = unit.flatten(2).norm(dim=2)
    torch.testing.assert_close(norms, torch.ones_like(norms))

    # Central finite differences in float64 along random directions.
    teacher64 = copy.deepcopy(teacher).double()
    gen = torch.Generator().manual_seed(5)
    h = 1e-6
    for i in range(3):
        v = torch.randn((1, 8, 8), generator=gen, dtype=torch.float64)
        xi = x[i].double()
        for j in range(classes.shape[1]):
            t = int(classes[i, j])
            with torch.no_grad():
                up = F.log_softmax(teacher64((xi + h * v).unsqueeze(0)), dim=1)[0, t]
                down = F.log_softmax(teacher64((xi - h * v).unsqueeze(0)), dim=1)[0, t]
            fd = float((up - down) / (2 * h))
            assert float((raw[i, j].double() * v).sum()) == pytest.approx(fd, rel=1e-3, abs=1e-5)


def test_chunks_autocast_inference_mode_and_devices_agree(
        teacher_dir: Path, digits: DataBundle) -> None:
    x, y, classes = batch(digits)
    reference = build(teacher_dir)(x, y, classes)
    torch.testing.assert_close(build(teacher_dir, chunk_size=5)(x, y, classes), reference,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(build(teacher_dir, device="cpu")(x, y, classes), reference)
    source = build(teacher_dir)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the teacher stays in float32
        torch.testing.assert_close(source(x, y, classes), reference)
    with torch.inference_mode():
        inside = source(x, y, classes)
    torch.testing.assert_close(inside, reference)
    empty = source(x[:0], y[:0], classes[:0])
    assert empty.shape == (0, 4, 1, 8, 8)
    # float64 inputs: float32 targets, same values
    torch.testing.assert_close(source(x.double(), y, classes), reference)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_teacher_with_cpu_or_cuda_inputs_under_autocast(
        teacher_dir: Path, digits: DataBundle) -> None:
    x, y, classes = batch(digits)
    reference = build(teacher_dir, device="cpu")(x, y, classes)
    on_gpu = build(teacher_dir, device="cuda")
    out = on_gpu(x, y, classes)  # teacher on the GPU, inputs and result on the CPU
    assert out.device == x.device and out.dtype == torch.float32
    # cuDNN may use TF32 convolutions: compare directions, not bits
    assert float(cosine_alignment(out, reference).min()) > 0.999
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = on_gpu(x.cuda(), y.cuda(), classes.cuda())
    assert out.device.type == "cuda" and out.dtype == torch.float32
    assert float(cosine_alignment(out.cpu(), reference).min()) > 0.999


def test_teacher_is_frozen_and_build_leaves_the_global_rng_alone(teacher_dir: Path) -> None:
    rng = torch.get_rng_state()
    source = build(teacher_dir)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not source.teacher.training
    assert all(not p.requires_grad for p in source.teacher.parameters())


def test_teacher_aligns_with_itself(teacher_dir: Path, digits: DataBundle) -> None:
    teacher = load_run(teacher_dir).model
    for normalize in (True, False):
        cos = mean_alignment(teacher, digits.test, torch.arange(60), build(
            teacher_dir, normalize=normalize), num_classes=10, classes_per_image=10,
            batch_size=25)
        assert cos == pytest.approx(1.0, abs=1e-5)


def test_wrong_class_count_or_input_shape_names_both(teacher_dir: Path) -> None:
    params = RobustTeacher.Params(run=teacher_dir)
    with pytest.raises(ValueError, match=r"has 10 classes but the training data has 5") as e:
        RobustTeacher(params, small_context(channels=1, size=8, classes=5))
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(ValueError, match=r"\(1, 8, 8\) but the training data has \(3, 8, 8\)"):
        RobustTeacher(params, small_context(channels=3, size=8, classes=10))
    with pytest.raises(ValueError, match=r"\(1, 8, 8\) but the training data has \(1, 12, 12\)"):
        RobustTeacher(params, small_context(channels=1, size=12, classes=10))


def test_bad_params_and_calls(teacher_dir: Path) -> None:
    for bad in ({}, {"run": 5}, {"run": " "}, {"run": str(teacher_dir), "device": "tpu"},
                {"run": str(teacher_dir), "chunk_size": 0},
                {"run": str(teacher_dir), "typo": 1}):
        with pytest.raises(ValidationError):
            RobustTeacher.Params.model_validate(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            build(teacher_dir, device="cuda")
    source = build(teacher_dir)
    x = torch.rand(2, 1, 8, 8)
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"inputs must have shape \(N, 1, 8, 8\)"):
        source(torch.rand(2, 3, 8, 8), y, torch.zeros(2, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"classes must lie in \[0, 10\)"):
        source(x, y, torch.full((2, 1), 10))
    with pytest.raises(ValueError, match="int64"):
        source(x, y, torch.zeros(2, 1, dtype=torch.int32))


def test_missing_or_broken_run_folder_is_one_clear_error(tmp_path: Path,
                                                         teacher_dir: Path) -> None:
    missing = tmp_path / "no-such-run"
    with pytest.raises(ValueError, match="cannot load the teacher") as e:
        RobustTeacher(RobustTeacher.Params(run=missing), small_context())
    assert str(missing) in str(e.value) and len(str(e.value).splitlines()) == 1

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("spec.json", "config.json"):
        (broken / name).write_bytes((teacher_dir / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        RobustTeacher(RobustTeacher.Params(run=broken), small_context())

    # Through pagctl's registry (as 'pagctl train' builds it): a SpecError naming the field.
    reg = registry.Registry(
        "pagctl.target_gradients",
        {"robust_teacher": "pagctl_example_target_gradients:RobustTeacher"},
        entry_points=lambda group: [])
    ref = PluginRef(name="robust_teacher", params={"run": str(missing)})
    with pytest.raises(SpecError) as err:
        reg.build(ref, small_context(), "target_gradients")
    message = str(err.value)
    assert message.startswith("target_gradients: robust_teacher: params.run: ")
    assert str(missing) in message and len(message.splitlines()) == 1


def _installed() -> bool:
    return any(ep.name == "robust_teacher"
               for ep in metadata.entry_points(group="pagctl.target_gradients"))


@pytest.mark.skipif(not _installed(), reason="the robust_teacher entry point is not installed "
                    "(pip install -e plugins/pagctl-example-target-gradients)")
def test_pag_training_against_the_teacher(teacher_dir: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(registry.AUTOLOAD_ENV, raising=False)
    registry.target_gradients.refresh()
    try:
        spec = load_spec("digits-pag-nn", [
            *FAST, "target_gradients.name=robust_teacher",
            f"target_gradients.params.run={teacher_dir}", f"out_dir={tmp_path / 'student'}"])
        result = train(spec, device="cpu", progress=False)
    finally:
        registry.target_gradients.refresh()
    assert os.environ.get(registry.AUTOLOAD_ENV) is None
    record = result.last
    assert result.epochs_done == 1 and not result.interrupted
    assert record["pag"] is not None and torch.isfinite(torch.tensor(record["pag"]))
    assert 0.0 < record["pag"] < 2.0
    assert -1.0 <= record["alignment"] <= 1.0  # the monitor used the same source
    assert load_run(tmp_path / "student").spec.target_gradients.name == "robust_teacher"
