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


def _threat(ref: object) -> tuple[str, float]:
    """(norm, eps) of an attack reference, as the registry validates and declares it."""
    from pagctl import registry
    from pagctl.spec import PluginRef

    assert isinstance(ref, PluginRef)
    params = registry.attacks.validate_params(ref.name, ref.params, "attack")
    return str(registry.attacks.get(ref.name).norm), float(params.eps)  # type: ignore[attr-defined]


def test_every_adversarial_training_recipe_monitors_its_trained_threat() -> None:
    recipes = [n for n in builtin_spec_names() if load_spec(n).train.inner_attack is not None]
    assert len(recipes) >= 16
    for name in recipes:
        spec = load_spec(name)
        assert spec.eval.attack is not None, name
        assert _threat(spec.eval.attack) == _threat(spec.train.inner_attack), name


def test_an_unset_monitor_follows_the_inner_attack_and_a_set_one_is_kept() -> None:
    base = {"name": "x", "model": {"arch": "pagctl_small_cnn"}, "data": {"dataset": "digits"},
            "train": {"objective": "pgd_at", "inner_attack": {
                "name": "pgd_linf", "params": {"eps": "8/255", "steps": 3, "keep": "last"}}}}
    followed = RunSpec.model_validate(base).eval.attack
    assert followed is not None and followed.name == "pgd_linf"
    assert followed.params == {"eps": "8/255"}  # an evaluation's params otherwise
    assert RunSpec.model_validate(json.loads(
        RunSpec.model_validate(base).model_dump_json())).eval.attack == followed
    l2 = {**base, "train": {"objective": "trades", "inner_attack": {
        "name": "pgd_l2", "params": {"eps": 0.25}}}}
    assert _threat(RunSpec.model_validate(l2).eval.attack) == ("l2", 0.25)
    kept = RunSpec.model_validate({**base, "eval": {"attack": {"name": "pgd_l2"}}})
    assert kept.eval.attack is not None and kept.eval.attack.name == "pgd_l2"
    assert RunSpec.model_validate({**base, "eval": {"attack": None}}).eval.attack is None
    plain = RunSpec.model_validate({k: v for k, v in base.items() if k != "train"})
    assert plain.eval.attack is not None and plain.eval.attack.name == "pgd_l2"  # no AT


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
    ("train.bogus=1", "train.bogus: unknown key; remove it"),
    ("train.epoch=3", "train.epoch: unknown key; did you mean 'epochs'?"),
    ("modle.arch=x", "modle: unknown key; did you mean 'model'?"),
    ("model.std=[0]", "model.std"),
    ("data.dataset=imagenet21k", "data.dataset"),
    ("train.schedule=linear", "train.schedule"),
    ("version=2", "version"),
])
def test_validation_errors_name_the_dotted_path(override: str, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        load_spec("digits-pag-nn", [override])
    assert fragment in str(info.value)


def test_a_misspelt_plugin_param_gets_a_suggestion() -> None:
    from pagctl import registry

    with pytest.raises(SpecError, match=r"params\.stesp: unknown key; did you mean 'steps'\? "
                       r"remove it or check the spelling \(pagctl plugins pgd_linf\)"):
        registry.attacks.validate_params("pgd_linf", {"stesp": 3}, "eval.attack")


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


@pytest.mark.parametrize(("override", "field"), [
    ("train.lr=.inf", "train.lr"), ("train.pag_weight=.inf", "train.pag_weight"),
    ("train.lr=.nan", "train.lr"), ("model.mean=[.nan]", "model.mean.0"),
    ("data.test_fraction=.nan", "data.test_fraction"),
    ("train.pag_warmup_factor=-.inf", "train.pag_warmup_factor"),
])
def test_infinite_and_nan_floats_are_refused_naming_the_field(override: str, field: str) -> None:
    with pytest.raises(SpecError) as info:
        load_spec("digits-vanilla", [override])
    assert str(info.value).startswith(f"{field}: ") and "finite" in str(info.value)


def test_every_float_of_every_spec_and_plugin_is_finite() -> None:
    """The spec sections, score specs and every built-in plugin's Params refuse inf/NaN."""
    import typing

    from pydantic import ValidationError

    from pagctl import registry
    from pagctl.score.spec import ScoreSpec

    def holds_float(annotation: object) -> bool:
        return annotation is float or any(holds_float(a) for a in typing.get_args(annotation))

    models: list[type] = []

    def walk(model: type) -> None:
        if model in models:
            return
        models.append(model)
        for info in model.model_fields.values():  # type: ignore[attr-defined]
            for arg in (info.annotation, *getattr(info.annotation, "__args__", ())):
                if isinstance(arg, type) and hasattr(arg, "model_fields"):
                    walk(arg)

    walk(RunSpec)
    walk(ScoreSpec)
    for reg in (registry.target_gradients, registry.attacks):  # models have no Params
        for name in reg.names():
            walk(reg.get(name).Params)
    checked = 0
    for model in models:
        for field, info in model.model_fields.items():  # type: ignore[attr-defined]
            if holds_float(info.annotation):
                sequence = any(typing.get_origin(a) in (tuple, list)
                               for a in (info.annotation, *typing.get_args(info.annotation)))
                bad = [float("nan")] if sequence else float("nan")
                with pytest.raises(ValidationError) as caught:
                    model.model_validate({field: bad})  # type: ignore[attr-defined]
                assert any(e["loc"][:1] == (field,) and e["type"] == "finite_number"
                           for e in caught.value.errors()), (model, field)
                checked += 1
    assert checked > 40


# ---------------------------------------------------------------------------------------
# what the loader accepts is bounded, and so is what an error prints


def _spec_file(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def test_yaml_aliases_are_refused_before_they_expand(tmp_path: Path) -> None:
    import time

    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    body = "".join(f"    {line}\n" for line in lines)  # 9**9 strings once expanded
    path = _spec_file(tmp_path, "bomb.yaml", "model:\n  arch: x\n  kwargs:\n" + body)
    start = time.perf_counter()
    with pytest.raises(SpecError, match="YAML aliases .* are not allowed"):
        load_spec(path)
    assert time.perf_counter() - start < 5
    with pytest.raises(SpecError, match=r"--set model.kwargs: YAML aliases"):
        load_spec("digits-vanilla", ["model.kwargs={a: &x [1], b: *x}"])


@pytest.mark.parametrize(("name", "text", "message"), [
    ("dup.yaml", "model: {arch: a}\nmodel: {arch: b}\n", "'model' appears twice"),
    ("dup.json", '{"model": {"arch": "a"}, "model": {"arch": "b"}}', "'model' appears twice"),
    ("deep.yaml", "model: " + "[" * 40 + "]" * 40 + "\n", "nested deeper than 16"),
    ("deep.json", '{"a": ' + "[" * 3000 + "]" * 3000 + "}", "nested deeper than 16"),
])
def test_duplicate_keys_and_deep_nesting_are_refused(tmp_path: Path, name: str, text: str,
                                                      message: str) -> None:
    with pytest.raises(SpecError, match=message) as info:
        load_spec(_spec_file(tmp_path, name, text))
    assert "\n" not in str(info.value)


def test_a_huge_spec_file_is_refused_unread(tmp_path: Path) -> None:
    path = _spec_file(tmp_path, "big.yaml", "# " + "x" * (2 << 20) + "\nmodel: {arch: a}\n")
    with pytest.raises(SpecError, match=r"bytes; a spec is at most 1,048,576"):
        load_spec(path)


def test_an_error_never_echoes_a_huge_value(tmp_path: Path) -> None:
    huge = "[" + ", ".join(["1"] * 20000) + "]"
    with pytest.raises(SpecError) as info:
        load_spec("digits-vanilla", [f"train.lr={huge}"])
    text = str(info.value)
    assert text.startswith("train.lr: ") and len(text) < 500
    many = {f"k{i}": i for i in range(100)}
    with pytest.raises(SpecError) as info:
        load_spec("digits-vanilla", [f"train={json.dumps(many)}"])
    lines = str(info.value).splitlines()
    assert len(lines) == 21 and lines[-1] == "(80 more problems not shown)"


@pytest.mark.parametrize("out", ["", "."])
def test_the_current_folder_is_not_a_run_folder(out: str) -> None:
    with pytest.raises(SpecError, match="out_dir: give a folder name"):
        load_spec("digits-vanilla", [], {"out_dir": Path(out)})


@pytest.mark.parametrize("override", ["train.seed=-1", f"train.seed={2**32}",
                                      "data.split_seed=-5"])
def test_seeds_stay_in_the_range_every_generator_accepts(override: str) -> None:
    with pytest.raises(SpecError, match="seed"):
        load_spec("digits-vanilla", [override])


@pytest.mark.parametrize("spec,overrides,line", [
    ("digits-vanilla", ["train.beta=3"],
     "train.beta: 3.0 weighs the robust KL term of objectives trades and mart; objective 'ce' "
     "ignores it: remove it, or choose objective trades or mart"),
    ("digits-pgd-at", ["train.beta=0"], "train.beta: 0.0 weighs the robust KL term"),
    ("digits-vanilla", ["train.attack_mode=eval"],
     "train.attack_mode: 'eval' sets BatchNorm's mode during the inner attack; objective 'ce' "
     "makes no attack"),
    ("digits-vanilla", ["train.milestones=[5, 8]"],
     "train.milestones: [5, 8] are the drops of schedule 'multistep'; schedule 'cosine' "
     "ignores them: remove them, or set train.schedule: multistep"),
    ("digits-vanilla", ["train.schedule=step", "train.lr_gamma=0.5"],
     "train.lr_gamma: 0.5 is the factor of schedule 'multistep'; schedule 'step' ignores it"),
])
def test_a_setting_the_run_would_ignore_is_refused_naming_it(
        spec: str, overrides: list[str], line: str) -> None:
    """beta without trades or mart, attack_mode without an inner attack, milestones and
    lr_gamma without the multistep schedule: the user believes in a run other than the one
    that would be trained."""
    with pytest.raises(SpecError) as info:
        load_spec(spec, overrides)
    [message] = str(info.value).splitlines()
    assert message.startswith(line), message


def test_an_ignored_setting_counts_only_when_set_to_other_than_its_default(
        tmp_path: Path) -> None:
    """A default written out (as spec.json writes every field) is no problem; the objective
    or schedule that uses the setting takes any value; a run folder's spec.json that holds
    an ignored value (written before the check) is still read."""
    spec = load_spec("digits-vanilla", ["train.beta=6", "train.attack_mode=auto",
                                        "train.milestones=[]", "train.lr_gamma=0.1"])
    assert spec.train.beta == 6.0
    assert load_spec("digits-trades", ["train.beta=3"]).train.beta == 3.0
    assert load_spec("digits-vanilla", ["train.schedule=multistep", "train.milestones=[5]",
                                        "train.lr_gamma=0.5"]).train.lr_gamma == 0.5
    file = tmp_path / "spec.json"
    file.write_text(spec.model_dump_json())
    assert load_spec(str(file)) == spec  # a spec.json round trip: every field set
    data = json.loads(spec.model_dump_json())
    data["train"]["beta"] = 3.0
    assert RunSpec.model_validate(data).train.beta == 3.0  # how run folders are read
