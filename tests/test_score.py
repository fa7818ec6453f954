"""Score models (pagctl.score: spec, model, training) and the SBG target-gradient source."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pagctl import checkpoint
from pagctl.data.toy import toy_sample, toy_score
from pagctl.errors import CheckpointError, SpecError
from pagctl.records import ScoreTrainRecord
from pagctl.score.figures import SAMPLES_FILE
from pagctl.score.model import (
    ScoreModel,
    ScoreModelConfig,
    build_score_model,
    load_score_run,
    sample,
)
from pagctl.score.spec import ScoreSpec, builtin_score_spec_names, load_score_spec
from pagctl.score.train import train_score
from pagctl.spec import builtin_spec_names
from pagctl.target_gradients.sbg import SBG, noise_seed
from pagctl.testing import check_target_gradient_source, small_context

try:
    import matplotlib  # noqa: F401

    HAVE_MPL = True
except ImportError:  # pragma: no cover
    HAVE_MPL = False

# A digits score model trained for a few steps: enough for file, resume and plugin checks.
TINY_DIGITS = ["model.width=8", "model.blocks=1", "train.steps=40", "train.batch_size=64",
               "train.lr=3e-3", "train.warmup_steps=5", "train.log_every=10",
               "train.save_every=20", "sample.steps=3", "sample.per_class=2"]
# The toy model of the score-recovery proof: about 10 s on one core.
TOY_PROOF = ["model.width=64", "model.blocks=3", "train.steps=2000", "train.batch_size=256",
             "train.null_prob=0.2", "sample.per_class=20"]
TINY_TOY = ["model.width=16", "model.blocks=1", "train.steps=30", "train.batch_size=32",
            "train.warmup_steps=3", "train.log_every=5", "train.save_every=10",
            "sample.per_class=0"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("score") / "digits"
    spec = load_score_spec("score-digits", [*TINY_DIGITS, f"out_dir={out}"])
    result = train_score(spec, device="cpu", progress=False)
    assert not result.interrupted and result.steps_done == 40
    return out


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("score") / "toy"
    train_score(load_score_spec("score-toy", [*TOY_PROOF, f"out_dir={out}"]), device="cpu",
                progress=False)
    return out


def _randomised(config: ScoreModelConfig) -> ScoreModel:
    """A model whose zero-initialised layers are filled, so every input path matters."""
    model = build_score_model(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _config(network: str, shape: tuple[int, int, int], classes: int) -> ScoreModelConfig:
    return ScoreModelConfig(network=network, num_classes=classes,  # type: ignore[arg-type]
                            input_shape=shape, width=8, channel_mult=(1, 2), blocks=1,
                            center=(0.5,) * shape[0], sigma_data=0.5, sigma_min=0.01,
                            sigma_max=1.0)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)


# ---------------------------------------------------------------------------------------
# the network


@pytest.mark.parametrize("network, shape, classes", [
    ("unet", (1, 8, 8), 10), ("unet", (3, 32, 32), 10), ("mlp", (2, 1, 1), 2)])
def test_network_shapes_and_the_null_class(network: str, shape: tuple[int, int, int],
                                           classes: int) -> None:
    rng = torch.get_rng_state()
    model = _randomised(_config(network, shape, classes))
    assert torch.equal(torch.get_rng_state(), rng)  # building leaves the global RNG alone
    g = torch.Generator().manual_seed(1)
    x = torch.rand((3, *shape), generator=g)
    y = torch.tensor([0, 1, classes - 1])
    with torch.no_grad():
        eps = model(x, 0.3, y)
        uncond = model(x, 0.3, None)
        null = model(x, torch.full((3,), 0.3), torch.full((3,), model.null_class))
        score = model.score(x, 0.3, y)
    assert eps.shape == x.shape and eps.dtype == torch.float32
    assert torch.equal(uncond, null)  # None means the null class
    assert (eps - uncond).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # conditioning matters
    torch.testing.assert_close(score, -eps / 0.3)
    with torch.no_grad():
        other = model(x, 0.05, y)
    assert not torch.allclose(eps, other)  # so does the noise level


def test_unet_needs_divisible_sizes() -> None:
    with pytest.raises(ValueError, match="divisible by 2"):
        _config("unet", (1, 7, 7), 10)


# ---------------------------------------------------------------------------------------
# specs


def test_builtin_score_specs_validate_and_stay_out_of_the_run_specs() -> None:
    names = set(builtin_score_spec_names())
    assert {"score-digits", "score-toy", "score-cifar10"} <= names
    assert not names & set(builtin_spec_names())
    for name in names:
        spec = load_score_spec(name)
        assert isinstance(spec, ScoreSpec) and spec.name == name
    assert load_score_spec("score-toy").model.resolved_kind((2, 1, 1)) == "mlp"
    assert load_score_spec("score-digits").model.resolved_kind((1, 8, 8)) == "unet"


@pytest.mark.parametrize("override, fragment", [
    ("train.steps=0", "train.steps"),
    ("train.bogus=1", "train.bogus: unknown key"),
    ("train.sigma_max=0.001", "sigma_max (0.001) must exceed sigma_min"),
    ("model.kind=transformer", "model.kind"),
    ("data.augment=crop_flip", "data.augment: score training does not crop"),
])
def test_score_spec_errors_are_one_line_with_the_path(override: str, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        load_score_spec("score-digits", [override])
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_unknown_builtin_score_spec_suggests_a_name() -> None:
    with pytest.raises(SpecError, match="Did you mean 'score-digits'"):
        load_score_spec("score-digit")


# ---------------------------------------------------------------------------------------
# training and the run folder


def test_run_folder_files_loss_and_samples(digits_run: Path) -> None:
    names = {p.name for p in digits_run.iterdir()}
    assert {"model.safetensors", "config.json", "spec.json", "metrics.jsonl",
            "state.safetensors", "state.json"} <= names
    assert not [n for n in names if n.startswith(".")]  # no temporary files left
    config = json.loads((digits_run / "config.json").read_text())
    assert config["kind"] == "score_model" and config["network"] == "unet"
    assert config["num_classes"] == 10 and config["input_shape"] == [1, 8, 8]
    assert config["trained_steps"] == 40 and config["ema"] is True
    records = [r.to_json() for r in checkpoint.read_metrics(digits_run).of(ScoreTrainRecord)]
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    assert records[-1]["loss"] < records[0]["loss"]  # denoising score matching learns
    assert all(r["seconds"] > 0 for r in records)
    if HAVE_MPL:
        assert (digits_run / SAMPLES_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = load_score_run(digits_run)
    assert run.spec is not None and run.spec.train.steps == 40
    assert not run.model.training
    assert not any(p.requires_grad for p in run.model.parameters())


def test_existing_folder_is_refused(digits_run: Path) -> None:
    spec = load_score_spec("score-digits", [*TINY_DIGITS, f"out_dir={digits_run}"])
    with pytest.raises(CheckpointError, match="already exists"):
        train_score(spec, device="cpu", progress=False)


def test_corrupt_or_missing_files_are_one_line_checkpoint_errors(digits_run: Path,
                                                                 tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(digits_run, broken)
    weights = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    rng = torch.get_rng_state()
    with pytest.raises(CheckpointError) as info:
        load_score_run(broken)
    assert "model.safetensors" in str(info.value) and "\n" not in str(info.value)
    assert torch.equal(torch.get_rng_state(), rng)

    config = json.loads((digits_run / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(weights)
    (broken / "config.json").write_text(json.dumps({**config, "width": 16}))
    with pytest.raises(CheckpointError, match="do not match config.json") as info:
        load_score_run(broken)
    assert "\n" not in str(info.value)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: unreadable"):
        load_score_run(broken)
    (broken / "config.json").write_text(json.dumps({"architecture": "pagctl_small_cnn"}))
    with pytest.raises(CheckpointError, match="not a score model"):
        load_score_run(broken)
    with pytest.raises(CheckpointError, match="no such score run folder"):
        load_score_run(tmp_path / "nowhere")


@pytest.mark.usefixtures("sigint_default")
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(workdir: Path) -> None:
    spec_a = load_score_spec("score-toy", [*TINY_TOY, "out_dir=a"])
    assert not train_score(spec_a, device="cpu", progress=False).interrupted

    spec_b = load_score_spec("score-toy", [*TINY_TOY, "out_dir=b"])

    def interrupt(step: int) -> None:
        if step == 12:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, handled by the loop

    stopped = train_score(spec_b, device="cpu", progress=False, on_step=interrupt)
    assert stopped.interrupted and stopped.steps_done == 13
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    meta = json.loads((workdir / "b" / "state.json").read_text())
    assert meta["step"] == 13
    with pytest.raises(SpecError, match="spec differs"):
        train_score(load_score_spec("score-toy", [*TINY_TOY, "out_dir=b", "train.lr=0.1"]),
                    device="cpu", progress=False, resume=True)
    resumed = train_score(spec_b, device="cpu", progress=False, resume=True)
    assert not resumed.interrupted and resumed.steps_done == 30
    for name in ("model.safetensors", "state.safetensors"):
        wa = checkpoint.load_tensors(workdir / "a" / name)
        wb = checkpoint.load_tensors(workdir / "b" / name)
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), (name, key)

    def losses(run: str) -> list[tuple[int, float]]:
        return [(r.step, r.loss) for r in checkpoint.read_metrics(workdir / run)
                .of(ScoreTrainRecord)]

    assert losses("a") == losses("b")


# ---------------------------------------------------------------------------------------
# the key proof: the learned scores match the toy's closed form


def test_toy_score_model_recovers_the_analytic_scores(toy_run: Path) -> None:
    model = load_score_run(toy_run).model
    x, y = toy_sample(2000, seed=123)
    g = torch.Generator().manual_seed(5)
    report = {}
    for sigma in (0.05, 0.1, 0.2):
        x_sigma = x + sigma * torch.randn(x.shape, generator=g)
        with torch.no_grad():
            cond = model.score(x_sigma, sigma, y)
            uncond = model.score(x_sigma, sigma, None)
            other = model.score(x_sigma, sigma, 1 - y)
        true_cond = toy_score(x_sigma, y, noise=sigma)
        true_uncond = toy_score(x_sigma, None, noise=sigma)
        true_other = toy_score(x_sigma, 1 - y, noise=sigma)
        # SBG for both classes of every point: ∇ log p(t | x_σ) = ∇ log p(x_σ|t) − ∇ log p(x_σ)
        sbg = torch.cat([_cos(cond - uncond, true_cond - true_uncond),
                         _cos(other - uncond, true_other - true_uncond)]).mean()
        report[sigma] = (float(_cos(cond, true_cond).mean()),
                         float(_cos(uncond, true_uncond).mean()), float(sbg))
    print("sigma: (cos conditional, cos unconditional, cos SBG)", report)
    for sigma, (c, u, s) in report.items():
        assert c >= 0.95, (sigma, report)
        assert u >= 0.9, (sigma, report)
        assert s >= 0.8, (sigma, report)


def test_toy_samples_land_on_their_class_modes(toy_run: Path) -> None:
    model = load_score_run(toy_run).model
    classes = torch.arange(2).repeat_interleave(100)
    rng = torch.get_rng_state()
    points = sample(model, classes, steps=24, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), rng)
    assert points.shape == (200, 2, 1, 1)
    from pagctl.data.toy import toy_log_density

    own = toy_log_density(points, classes)
    wrong = toy_log_density(points, 1 - classes)
    assert float((own > wrong).float().mean()) >= 0.9
    if HAVE_MPL:
        assert (toy_run / SAMPLES_FILE).is_file()


# ---------------------------------------------------------------------------------------
# the SBG source


def _ctx() -> object:
    return small_context(channels=1, size=8, classes=10)


@pytest.mark.parametrize("extra", [{}, {"shared_noise": False, "draws": 2, "chunk_size": 7}])
def test_sbg_conforms(digits_run: Path, extra: dict[str, object]) -> None:
    out = check_target_gradient_source(SBG, params={"run": str(digits_run), **extra},
                                       ctx=_ctx())  # type: ignore[arg-type]
    assert out.dtype == torch.float32


def test_sbg_is_the_score_difference_at_fixed_per_image_noise(digits_run: Path) -> None:
    ctx = small_context(channels=1, size=8, classes=10, seed=3)
    source = SBG(SBG.Params(run=digits_run, sigma=0.3), ctx)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3])
    classes = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])
    index = torch.tensor([5, 9, 5, 11])
    target = source(x, labels, classes, index=index)
    assert target.shape == (4, 2, 1, 8, 8) and not target.requires_grad
    # the formula, with the noise of image i drawn from a generator seeded by (seed, index)
    model = load_score_run(digits_run).model
    for i in range(4):
        eps = torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(
            noise_seed(3, int(index[i]))))
        x_sigma = x[i: i + 1] + 0.3 * eps
        with torch.no_grad():
            for j in range(2):
                expected = (model.score(x_sigma, 0.3, classes[i, j: j + 1])
                            - model.score(x_sigma, 0.3, None))
                torch.testing.assert_close(target[i, j], expected[0], rtol=1e-4, atol=1e-4)
    # same index, same target (on any call); different index, different noise
    again = source(x, labels, classes, index=index)
    assert torch.equal(again, target)
    shifted = source(x, labels, classes, index=index + 1)
    assert not torch.allclose(shifted, target)
    # without index: fresh draws from the source's own generator
    first = source(x, labels, classes)
    second = source(x, labels, classes)
    assert not torch.allclose(first, second)
    rebuilt = SBG(SBG.Params(run=digits_run, sigma=0.3), ctx)
    assert torch.equal(rebuilt(x, labels, classes), first)


def test_sbg_align_score_shards_merge_exactly(digits_run: Path, tmp_path: Path) -> None:
    """align-score with SBG (noise drawn per call for test images) in two shards, each with
    a freshly built source as an independent job would have: the merge equals the unsharded
    score, because the engine reseeds the source per batch (``SBG.reseed``)."""
    from dataclasses import replace

    from torch import nn

    import pagctl.api as pg
    from pagctl.align import AlignmentJob, alignment_report, evaluate_alignment
    from pagctl.data import TensorImageDataset
    from pagctl.evaluation.request import EvaluationRequest

    g = torch.Generator().manual_seed(1)
    data = TensorImageDataset(torch.rand(30, 1, 8, 8, generator=g), torch.arange(30) % 10)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    ctx = small_context(channels=1, size=8, classes=10, seed=3)
    params = SBG.Params(run=digits_run, sigma=0.3)
    indices = torch.arange(30)
    common: dict[str, object] = {"classes_per_image": 2, "batch_size": 8, "seed": 3}
    bundle = pg.tensors(data.images, data.labels, num_classes=10)
    job = AlignmentJob("sbg", params, 2)
    request = EvaluationRequest(indices=indices, batch_size=8, seed=3, shard_dir=tmp_path)
    whole = evaluate_alignment(model, bundle, job, request.part(shard_dir=None),
                               SBG(params, ctx))  # type: ignore[arg-type]
    for i in range(2):
        evaluate_alignment(model, bundle, job, request.part(shard=(i, 2)),
                           SBG(params, ctx))  # type: ignore[arg-type]
    merged = evaluate_alignment(model, bundle, job, request.part(merge_shards=2),
                                SBG(params, ctx))  # type: ignore[arg-type]
    assert merged is not None
    assert replace(merged, seconds=0.0) == replace(whole, seconds=0.0)
    again = alignment_report(model, data, indices, SBG(params, ctx), num_classes=10,  # type: ignore[arg-type]
                             **common)
    assert whole is not None and again.mean == whole.mean  # and the score is reproducible
    other = SBG(SBG.Params(run=digits_run, sigma=0.3, seed=12345), ctx)
    assert alignment_report(model, data, indices, other, num_classes=10,  # type: ignore[arg-type]
                            **common).mean != whole.mean


def test_sbg_rejects_a_score_model_of_other_data(digits_run: Path) -> None:
    with pytest.raises(ValueError, match=r"10 classes but the data have 2"):
        SBG(SBG.Params(run=digits_run), small_context(channels=1, size=8, classes=2))
    with pytest.raises(ValueError, match=r"\(1, 8, 8\) but the data are \(3, 8, 8\)"):
        SBG(SBG.Params(run=digits_run), small_context(channels=3, size=8, classes=10))
    with pytest.raises(ValueError, match="outside the score model's training range"):
        SBG(SBG.Params(run=digits_run, sigma=5.0), small_context())
    with pytest.raises(CheckpointError):
        SBG(SBG.Params(run=digits_run / "missing"), small_context())
