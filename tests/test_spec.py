from __future__ import annotations

import json
from pathlib import Path

import pytest

from pagctl.errors import SpecError
from pagctl.spec import RunSpec, apply_override, builtin_spec_names, load_spec

EXPECTED = {"digits-vanilla", "digits-pag-oi", "digits-pag-cm", "digits-pag-nn",
            "toy-vanilla", "toy-pag-nn", "cifar10-rn18-vanilla", "cifar10-rn18-pag-oi",
            "cifar10-rn18-pag-cm", "cifar10-rn18-pag-nn", "cifar10-vit-pag-nn",
            "digits-pag-sbg", "toy-pag-score", "cifar10-rn18-pag-sbg"}


def test_builtin_specs_all_validate() -> None:
    names = set(builtin_spec_names())
    assert names >= EXPECTED
    for name in names:
        spec = load_spec(name)
        assert spec.name == name
        assert spec.version == 1


def test_paper_recipes_carry_the_official_hyperparameters() -> None:
    rn = load_spec("cifar10-rn18-pag-nn")
    assert (rn.train.lr, rn.train.momentum, rn.train.weight_decay) == (0.01, 0.9, 1e-4)
    assert rn.train.epochs == 100 and rn.data.batch_size == 64 and rn.train.seed == 3407
    assert rn.train.schedule == "step" and rn.train.classes_per_image == 10
    assert rn.train.pag_weight == pytest.approx(10 * 1.5)  # official pag_coeff 1.5
    vit = load_spec("cifar10-vit-pag-nn")
    assert vit.train.pag_weight == pytest.approx(30.0)
    assert vit.train.pag_warmup_epochs == 50
    assert vit.train.pag_weight * vit.train.pag_warmup_factor == pytest.approx(20.0)


def test_overrides_parse_yaml_values_and_nest() -> None:
    spec = load_spec("digits-pag-nn", ["train.epochs=3", "train.pag_weight=2.5",
                                       "target_gradients.params.pool_size=50",
                                       "eval.attack=null"])
    assert spec.train.epochs == 3 and spec.train.pag_weight == 2.5
    assert spec.target_gradients.params == {"pool_size": 50}
    assert spec.eval.attack is None


def test_spec_is_frozen_and_round_trips_through_json(tmp_path: Path) -> None:
    spec = load_spec("digits-pag-cm")
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        spec.train.epochs = 2  # type: ignore[misc]
    path = tmp_path / "s.json"
    path.write_text(spec.model_dump_json())
    assert load_spec(path) == spec
    assert RunSpec.model_validate(json.loads(spec.model_dump_json())) == spec


@pytest.mark.parametrize("override, fragment", [
    ("train.epochs=-1", "train.epochs"),
    ("train.epochs=many", "train.epochs"),
    ("train.bogus=1", "train.bogus: unknown key"),
    ("model.std=[0]", "model.std"),
    ("data.dataset=imagenet21k", "data.dataset"),
    ("train.schedule=linear", "train.schedule"),
    ("version=2", "version"),
])
def test_validation_errors_name_the_dotted_path(override: str, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        load_spec("digits-pag-nn", [override])
    assert fragment in str(info.value)


def test_bad_override_syntax_and_unknown_builtin() -> None:
    with pytest.raises(SpecError, match="KEY=VALUE"):
        apply_override({}, "train.epochs")
    with pytest.raises(SpecError, match="Did you mean 'digits-pag-nn'"):
        load_spec("digits-pag-mn")


def test_garbled_and_non_mapping_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    seq = tmp_path / "seq.yaml"
    seq.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(seq)
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")


def test_epsilon_fraction_strings() -> None:
    from pydantic import BaseModel

    from pagctl.protocols import Epsilon

    class P(BaseModel):
        eps: Epsilon

    assert P(eps="8/255").eps == pytest.approx(8 / 255)
    assert P(eps=0.5).eps == 0.5
    with pytest.raises(Exception, match="exact fraction"):
        P(eps="eight")
