"""The hostile-folder corpus: run folders, specs, records and shards crafted as an attacker
or a careless colleague would, each with the exact outcome every reader must give.

A run folder is data (docs/run-folder.md#trust). Every case below is run against every
command and API function that reads a folder: nothing it names is imported (a module that
writes a marker file when imported never runs), no number of another model, of other
images or of tampered bits is shown or recorded with exit 0, every refusal is one line with
exit 2, and a refused command leaves the folder byte for byte as it was and writes nothing
outside it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CliResult
from safetensors.torch import load_file, save_file

import pagctl.api as pg
from pagctl.errors import PagctlError

MARKER = "PWNED"
"""Written by the corpus's hostile module when it is imported, and by ``os.system`` when
called: it must never appear."""

EVIL_MODULE = f'''
from pathlib import Path
Path("{MARKER}").write_text("imported")
import torch

def make(num_classes=10, **kwargs):
    Path("{MARKER}").write_text("called")
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, num_classes))
'''

PRECIOUS = "a file of the user's, outside every run folder\n"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished 1-epoch digits run (no monitor), and beside it a second run of another
    seed (its weights are the foreign ones) and a third on another split of the digits."""
    root = tmp_path_factory.mktemp("corpus-base")
    for name, seed, split in (("base", 0, 0), ("other", 1, 0), ("split3", 0, 3)):
        pg.train("digits-vanilla", overrides=[
            "train.epochs=1", "eval.attack=null", "eval.align_source=null",
            f"train.seed={seed}", f"data.split_seed={split}", f"out_dir={root / name}"])
    return root / "base"


@pytest.fixture
def corpus_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working folder: the hostile module importable from it, a precious file beside."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil_mod.py").write_text(EVIL_MODULE)
    (tmp_path / "precious.txt").write_text(PRECIOUS)
    return tmp_path


def _copy(base: Path, where: Path) -> Path:
    run = where / "run"
    shutil.copytree(base, run)
    return run


def _edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def _set_arch(arch: str, kwargs: dict[str, Any]) -> Callable[[Path], None]:
    def craft(run: Path) -> None:
        def spec(d: dict[str, Any]) -> None:
            d["model"]["arch"], d["model"]["kwargs"] = arch, kwargs

        def config(d: dict[str, Any]) -> None:
            d["architecture"] = arch
            d["model_args"] = {"in_chans": 1, **kwargs}

        _edit_json(run / "spec.json", spec)
        _edit_json(run / "config.json", config)

    return craft


def _weight_loading_kwargs(run: Path) -> None:
    """timm keywords that would fetch or read other weights, in config.json."""
    _edit_json(run / "config.json", lambda d: d["model_args"].update(
        {"pretrained": True, "checkpoint_path": str(run.parent / "precious.txt"),
         "pretrained_cfg_overlay": {"file": str(run.parent / "precious.txt")}}))


def _edited_record(run: Path) -> None:
    """A real attack record, then a copy whose robust accuracy was edited by hand."""
    pg.record(run, pg.attack(run, attack="fgsm", eps=0.1, limit=16, probes=False))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[-1])
    record["robust_accuracy"], record["robust_correct"] = 0.9375, 15
    (run / "metrics.jsonl").write_text("\n".join([*lines[:-1], json.dumps(record)]) + "\n")


def _link_out(name: str, target: Callable[[Path], Path]) -> Callable[[Path], None]:
    def craft(run: Path) -> None:
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(target(run).resolve())

    return craft


def _garbage(name: str, data: bytes) -> Callable[[Path], None]:
    def craft(run: Path) -> None:
        (run / name).write_bytes(data)

    return craft


def _truncated_weights(run: Path) -> None:
    path = run / "model.safetensors"
    path.write_bytes(path.read_bytes()[:300])


def _three_classes(run: Path) -> None:
    """Weights and config of a 3-class head on 10-class digits (the spec unchanged)."""
    weights = load_file(str(run / "model.safetensors"))
    head = [k for k, v in weights.items() if v.shape[:1] == (10,)]
    save_file({k: (v[:3].contiguous() if k in head else v) for k, v in weights.items()},
              str(run / "model.safetensors"))
    _edit_json(run / "config.json", lambda d: d.update(num_classes=3))


def _hard_linked_metrics(run: Path) -> None:
    """metrics.jsonl a hard link of a file outside the folder (an append would land there)."""
    import os

    (run / "metrics.jsonl").unlink()
    os.link(run.parent / "precious.txt", run / "metrics.jsonl")


def _edited_interval(run: Path) -> None:
    """A real attack record whose robust interval was moved off its accuracy."""
    pg.record(run, pg.attack(run, attack="fgsm", eps=0.1, limit=16, probes=False))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[-1])
    record["robust_interval"] = [0.9, 0.99]
    (run / "metrics.jsonl").write_text("\n".join([*lines[:-1], json.dumps(record)]) + "\n")


def _other_data(run: Path) -> None:
    """spec.json edited to another split: the data it names are not the test images the
    run's weights were made with (what another --data-dir would hand it)."""
    _edit_json(run / "spec.json", lambda d: d["data"].update(split_seed=3))


def _not_a_run(run: Path) -> None:
    for path in run.iterdir():
        if path.name != "metrics.jsonl":
            path.unlink()


@dataclass(frozen=True)
class Case:
    """A crafted folder and, per reader, its outcome: ``("refused", words)`` (exit 2 or a
    PagctlError, one line holding ``words``), ``("warned", words)`` (exit 0 with a warning
    holding ``words``) or ``("ok", "")``."""

    name: str
    craft: Callable[[Path], None]
    outcomes: dict[str, tuple[str, str]]


CODE = ("refused", "names Python code to import and run")
MODEL_READERS = ("attack", "align-score", "dry-run", "api.load", "api.attack", "api.align")
ALL_OK = {reader: ("ok", "") for reader in (*MODEL_READERS, "compare", "api.compare")}

CASES = [
    Case("factory-in-folder", _set_arch("evil_mod:make", {}),
         {**{r: CODE for r in MODEL_READERS}, "compare": ("ok", ""),
          "api.compare": ("ok", "")}),
    Case("os-system-in-folder", _set_arch("os:system", {"command": f"touch {MARKER}"}),
         {**{r: CODE for r in MODEL_READERS}, "compare": ("ok", ""),
          "api.compare": ("ok", "")}),
    Case("weight-loading-kwargs", _weight_loading_kwargs, ALL_OK),
    Case("edited-record", _edited_record,
         {**ALL_OK, "compare": ("warned", "contradicts itself: robust_correct is 15 but its "
                                          "per-example bits count"),
          "api.compare": ("warned", "contradicts itself")}),
    Case("metrics-linked-out", _link_out("metrics.jsonl", lambda r: r.parent / "precious.txt"),
         {**ALL_OK, "attack": ("refused", "metrics.jsonl: is a symbolic link; pagctl never "
                                          "appends through one"),
          "align-score": ("refused", "metrics.jsonl: is a symbolic link"),
          "compare": ("warned", "a symbolic link out of the run folder"),
          "api.compare": ("warned", "a symbolic link out of the run folder")}),
    Case("weights-linked-out", _link_out("model.safetensors",
                                         lambda r: r.parent / "other-weights"),
         {**{r: ("refused", "model.safetensors: a symbolic link out of the run folder")
             for r in ("attack", "align-score", "api.load", "api.attack", "api.align")},
          "dry-run": ("ok", ""), "compare": ("ok", ""), "api.compare": ("ok", "")}),
    Case("lock-linked-out", _link_out(".pagctl.lock", lambda r: r.parent / "precious.txt"),
         {**ALL_OK, "attack": ("refused", ".pagctl.lock: is a symbolic link"),
          "align-score": ("refused", ".pagctl.lock: is a symbolic link")}),
    Case("damaged-spec", _garbage("spec.json", b"{not json"),
         {**{r: ("refused", "spec.json: invalid spec")
             for r in (*MODEL_READERS, "compare", "api.compare")},
          "dry-run": ("refused", "spec.json")}),
    Case("damaged-config", _garbage("config.json", b"\x00\xff garbage"),
         {**ALL_OK, **{r: ("refused", "config.json: unreadable")
                       for r in ("attack", "align-score", "api.load", "api.attack",
                                 "api.align")}}),
    Case("truncated-weights", _truncated_weights,
         {**ALL_OK, **{r: ("refused", "not a readable safetensors file")
                       for r in ("attack", "align-score", "api.load", "api.attack",
                                 "api.align")}}),
    Case("three-logits-for-ten-classes", _three_classes,
         {**ALL_OK, **{r: ("refused", "model: gives outputs (2, 3) for 2 image(s) of digits; "
                                      "expected (2, 10)")
                       for r in ("attack", "align-score", "api.attack", "api.align")}}),
    Case("hub-architecture", _set_arch("hf-hub:timm/resnet18.a1_in1k", {}),
         {**{r: ("refused", "fetch its configuration from the Hugging Face Hub")
             for r in ("attack", "align-score", "api.load", "api.attack", "api.align")},
          "dry-run": ("refused", "pretrained weights come from the network"),
          "compare": ("ok", ""), "api.compare": ("ok", "")}),
    Case("local-dir-elsewhere", _set_arch("local-dir:/tmp", {}),
         {**{r: ("refused", "makes timm read /tmp, outside the run folder")
             for r in ("attack", "align-score", "api.load", "api.attack", "api.align")},
          "dry-run": ("refused", "config.json"),
          "compare": ("ok", ""), "api.compare": ("ok", "")}),
    Case("metrics-hard-linked", _hard_linked_metrics,
         {**ALL_OK, "attack": ("refused", "metrics.jsonl: is a hard link shared with another "
                                          "file"),
          "align-score": ("refused", "is a hard link"),
          "compare": ("warned", "not valid JSON"), "api.compare": ("warned", "not valid JSON")}),
    Case("edited-interval", _edited_interval,
         {**ALL_OK, "compare": ("warned", "its robust_interval [0.9, 0.99] does not hold its "
                                          "robust_accuracy"),
          "api.compare": ("warned", "does not hold")}),
    Case("spec-names-other-data", _other_data,
         {**ALL_OK, **{r: ("refused", "are not the test images the run was trained or "
                                      "imported with")
                       for r in ("attack", "align-score", "api.attack", "api.align")}}),
    Case("not-a-run", _not_a_run,
         {**{r: ("refused", "no spec.json; not a pagctl run folder")
             for r in ("attack", "align-score", "api.load", "api.attack", "api.align",
                       "compare", "api.compare")},
          "dry-run": ("refused", "spec.json")}),
]


def _cli(run: Path, reader: str, pagctl: Callable[..., CliResult]) -> tuple[int, str]:
    argv = {
        "attack": ["attack", run, "--attack", "fgsm", "--param", "eps=0.1", "--limit", "8",
                   "--no-probes", "--no-progress"],
        "align-score": ["align-score", run, "--source", "class_mean", "-k", "2", "--limit",
                        "8", "--no-progress"],
        "compare": ["compare", run],
        "dry-run": ["train", run / "spec.json", "--dry-run", "--out", run.parent / "fresh"],
    }[reader]
    got = pagctl(*argv)
    return got.code, got.stderr


def _api(run: Path, reader: str) -> tuple[int, str]:
    import warnings

    calls: dict[str, Callable[[], Any]] = {
        "api.load": lambda: pg.load(run),
        "api.attack": lambda: pg.attack(run, attack="fgsm", eps=0.1, limit=8, probes=False),
        "api.align": lambda: pg.align_score(run, source="class_mean", classes_per_image=2,
                                            limit=8),
        "api.compare": lambda: pg.compare([run]),
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            result = calls[reader]()
    except PagctlError as exc:
        return 2, f"error: {exc}\n"
    told = "\n".join(result.warnings) + "\n" if reader == "api.compare" else ""
    return 0, told


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*")) if not p.is_symlink() and p.name != ".pagctl.lock"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_reader_meets_the_corpus_as_expected(
        case: Case, base: Path, corpus_dir: Path, pagctl: Callable[..., CliResult]) -> None:
    (corpus_dir / "other-weights").write_bytes(
        (base.parent / "other" / "model.safetensors").read_bytes())
    run = _copy(base, corpus_dir)
    case.craft(run)
    for reader, (outcome, words) in case.outcomes.items():
        before = _snapshot(corpus_dir)
        if reader.startswith("api."):
            code, err = _api(run, reader)
        else:
            code, err = _cli(run, reader, pagctl)
        where = f"{case.name} / {reader}: exit {code}, stderr:\n{err}"
        assert not (corpus_dir / MARKER).exists(), f"code ran: {where}"
        assert (corpus_dir / "precious.txt").read_text() == PRECIOUS, where
        assert "Traceback" not in err, where
        if outcome == "refused":
            assert code == 2, where
            lines = [line for line in err.strip().splitlines()
                     if not line.startswith("warning: ")]
            assert len(lines) == 1 and words in lines[0], where
            after = _snapshot(corpus_dir)
            assert after == before, f"a refused command changed files: {where}"
        else:
            assert code == 0, where
            if outcome == "warned":
                assert words in err, where
            else:
                assert "warning" not in err, where
        fresh = run.parent / "fresh"
        if fresh.exists():
            shutil.rmtree(fresh)


def test_a_factory_named_in_a_folder_runs_with_trust_only(
        base: Path, corpus_dir: Path, pagctl: Callable[..., CliResult]) -> None:
    """The same folder, trusted: `--trust-code` (``trust_code=True``) imports the factory,
    and only then (the marker is its proof)."""
    run = _copy(base, corpus_dir)
    _set_arch("evil_mod:make", {})(run)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    save_file(net.state_dict(), str(run / "model.safetensors"))
    assert pagctl("attack", run, "--attack", "fgsm", "--limit", "4", "--no-probes").code == 2
    assert not (corpus_dir / MARKER).exists()
    got = pagctl("attack", run, "--attack", "fgsm", "--param", "eps=0.1", "--limit", "4",
                 "--no-probes", "--no-progress", "--trust-code")
    assert got.code == 0, got.stderr
    assert (corpus_dir / MARKER).read_text() == "called"


def test_a_spec_file_naming_code_needs_trust_or_the_name_on_the_command_line(
        corpus_dir: Path, pagctl: Callable[..., CliResult]) -> None:
    """``train SPEC --dry-run`` and ``import SPEC`` with ``model.arch: evil_mod:make`` in the
    file are refused; naming the callable with ``--set`` (or ``--model``) is asking for
    it."""
    spec = corpus_dir / "spec.yaml"
    spec.write_text("version: 1\nname: s\nmodel: {arch: 'evil_mod:make'}\n"
                    "data: {dataset: digits}\ntrain: {epochs: 1}\n")
    for argv in (["train", spec, "--dry-run", "--out", "runs/s"],
                 ["import", spec, "--out", "runs/i"]):
        got = pagctl(*argv)
        assert got.code == 2 and "names Python code to import and run" in got.stderr
        assert len(got.stderr.strip().splitlines()) == 1
        assert not (corpus_dir / MARKER).exists() and not (corpus_dir / "runs").exists()
    got = pagctl("train", spec, "--dry-run", "--out", "runs/s", "--set",
                 "model.arch=evil_mod:make")
    assert got.code == 0, got.stderr
    assert (corpus_dir / MARKER).exists()


def test_a_record_enters_only_the_run_it_measured(base: Path, corpus_dir: Path) -> None:
    """`pagctl.api.record` refuses a report of another model, of the run's model on other
    images, a folder that is not a run, and no point; nothing is appended, and no
    metrics.jsonl is created where there was none."""
    run = _copy(base, corpus_dir)
    metrics = (run / "metrics.jsonl").read_bytes()
    own = pg.attack(run, attack="fgsm", eps=0.1, limit=16, probes=False)
    assert not isinstance(own, list)
    digits = pg.dataset("digits")
    x = torch.stack([digits.test[i][0] for i in range(16)])
    y = torch.tensor([digits.test[i][1] for i in range(16)])
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    foreign = pg.attack(linear, (x, y), attack="fgsm", eps=0.1, probes=False)
    other_images = pg.attack(pg.load(run), pg.dataset("digits", split_seed=3),
                             attack="fgsm", eps=0.1, limit=16, probes=False)
    other_run = pg.attack(base.parent / "other", attack="fgsm", eps=0.1, limit=16,
                          probes=False)
    assert not isinstance(foreign, list) and not isinstance(other_images, list)
    assert own.subset["indices_sha256"] == other_images.subset["indices_sha256"]
    for report, words in ((foreign, "measured another model"),
                          (other_run, "measured another model"),
                          (other_images, "measured other images than the run's test points"),
                          ([own, foreign], "measured another model")):
        with pytest.raises(PagctlError, match=words):
            pg.record(run, report)  # type: ignore[arg-type]
        assert (run / "metrics.jsonl").read_bytes() == metrics
    with pytest.raises(PagctlError, match="no model-best.safetensors"):
        pg.record(run, own, weights="best")  # no best weights in this run
    empty = corpus_dir / "not-a-run"
    empty.mkdir()
    with pytest.raises(PagctlError, match="no spec.json; not a pagctl run folder"):
        pg.record(empty, own)
    assert list(empty.iterdir()) == []
    from pagctl.provenance import Measurement, record_measurements
    from pagctl.records import AttackRecord

    nothing = AttackRecord(attack="fgsm", n=0, robust_accuracy=0.0, model_sha256="x")
    with pytest.raises(PagctlError, match="measured no point"):
        record_measurements(run, [Measurement(nothing, torch.zeros(0, dtype=torch.int64))])
    assert (run / "metrics.jsonl").read_bytes() == metrics
    pg.record(run, own)  # the run's own report is recorded
    score = pg.align_score(run, source="class_mean", classes_per_image=2, limit=8)
    assert score is not None
    pg.record(run, score)
    kinds = [json.loads(line)["kind"]
             for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert kinds[-2:] == ["attack", "align"]


def test_outputs_never_replace_a_run_file(base: Path, corpus_dir: Path,
                                          pagctl: Callable[..., CliResult]) -> None:
    """--save-adversarial, --state and bank --out never name a run folder's own file:
    refused before any work, the weights untouched (--plot and --save-images take .png
    names only)."""
    run = _copy(base, corpus_dir)
    before = _snapshot(run)
    attack = ["attack", run, "--attack", "fgsm", "--param", "eps=0.1", "--limit", "8",
              "--no-probes", "--no-progress"]
    for argv, option in (
            ([*attack, "--save-adversarial", run / "model.safetensors"], "--save-adversarial"),
            ([*attack, "--state", run / "model-best.safetensors"], "--state"),
            ([*attack, "--state", run / "state.safetensors"], "--state"),
            (["bank", "class_mean", "--spec", "digits-pag-cm", "--out",
              base.parent / "other" / "model.safetensors"], "--out")):
        got = pagctl(*argv)
        assert got.code == 2 and len(got.stderr.strip().splitlines()) == 1, got.stderr
        assert got.stderr.startswith(f"error: {option}: ") and "run folder's own file" in \
            got.stderr, got.stderr
    assert _snapshot(run) == before


def test_a_report_of_the_same_weights_behind_a_hook_is_another_model(
        base: Path, corpus_dir: Path) -> None:
    """The digest covers what a model computes, not only its weights: the run's own weights
    behind a forward hook that rewrites the outputs are another model."""
    run = _copy(base, corpus_dir)
    loaded = pg.load(run)
    loaded.model.net.register_forward_hook(lambda module, args, out: out.flip(1))
    hooked = pg.attack(loaded, attack="fgsm", eps=0.1, limit=16, probes=False)
    with pytest.raises(PagctlError, match="measured another model"):
        pg.record(run, hooked)


def test_compare_never_pairs_other_images(base: Path, corpus_dir: Path,
                                          pagctl: Callable[..., CliResult]) -> None:
    """A first-time user's mistake: points 0..15 of another split's test set are other
    images. Both runs' own reports recorded, compare shows no paired test, --strict fails."""
    a = _copy(base, corpus_dir)
    b = corpus_dir / "split3"
    shutil.copytree(base.parent / "split3", b)
    for run in (a, b):
        pg.record(run, pg.attack(run, attack="fgsm", eps=0.1, limit=16, probes=False))
    got = pagctl("compare", a, b, "--format", "json")
    assert got.code == 0, got.stderr
    data = json.loads(got.stdout)["records"][0]
    assert data["pairs"] == []
    assert any("the same indices of different images" in m for m in data["mismatches"])
    strict = pagctl("compare", a, b, "--strict")
    assert strict.code == 2 and "different images" in strict.stderr


def test_tampered_and_damaged_shards_are_refused_naming_the_file(
        base: Path, corpus_dir: Path, pagctl: Callable[..., CliResult]) -> None:
    """Shards of an attack and of an alignment score, then: robust bits set to the clean
    bits (a shard claiming more robust points), metadata that is not JSON, a truncated
    file, cosines edited. Each merge is refused in one line naming the file; the untouched
    shards merge into the unsharded result."""
    run = _copy(base, corpus_dir)
    attack = ["attack", run, "--attack", "fgsm", "--param", "eps=0.3", "--limit", "40",
              "--batch-size", "10", "--no-probes", "--no-progress"]
    align = ["align-score", run, "--source", "class_mean", "-k", "2", "--limit", "40",
             "--batch-size", "10", "--no-progress"]
    for argv in (attack, align):
        for i in range(2):
            assert pagctl(*argv, "--shard", f"{i}/2").code == 0
    shards = sorted((run / "shards").iterdir())
    attack_shard = next(p for p in shards if p.name.startswith("fgsm-"))
    align_shard = next(p for p in shards if p.name.startswith("align-"))
    pristine = {p: p.read_bytes() for p in shards}
    metrics = (run / "metrics.jsonl").read_bytes()

    def tamper(path: Path, edit: Callable[[dict[str, torch.Tensor], dict[str, str]], None]
               ) -> None:
        from safetensors import safe_open

        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata())
        edit(tensors, meta)
        save_file(tensors, str(path), metadata=meta)

    def robust_as_clean(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
        assert not torch.equal(t["robust"], t["clean"])
        t["robust"] = t["clean"].clone()

    def cosines_up(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
        t["cosines"] = t["cosines"].clamp(max=0.5) + 0.4

    def not_json(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
        key = next(iter(m.keys() - {"format"}))
        m[key] = m[key][:-7]

    cases = [(attack, attack_shard, lambda p: tamper(p, robust_as_clean),
              "damaged or edited"),
             (attack, attack_shard, lambda p: tamper(p, not_json),
              "metadata is damaged (not a JSON object)"),
             (attack, attack_shard, lambda p: p.write_bytes(p.read_bytes()[:100]),
              "not a readable safetensors file"),
             (align, align_shard, lambda p: tamper(p, cosines_up), "damaged or edited"),
             (align, align_shard, lambda p: tamper(p, not_json),
              "metadata is damaged (not a JSON object)")]
    for argv, path, damage, words in cases:
        damage(path)
        got = pagctl(*argv, "--merge-shards", "2")
        lines = got.stderr.strip().splitlines()
        assert got.code == 2 and len(lines) == 1, got.stderr
        assert str(path) in lines[0] and words in lines[0], lines
        assert (run / "metrics.jsonl").read_bytes() == metrics  # nothing recorded
        path.write_bytes(pristine[path])
    for argv in (attack, align):
        got = pagctl(*argv, "--merge-shards", "2", "--format", "json")
        assert got.code == 0, got.stderr


def test_a_consistent_forgery_of_clean_bits_meets_the_model(
        base: Path, corpus_dir: Path, pagctl: Callable[..., CliResult]) -> None:
    """A shard rewritten consistently (its digest recomputed, its invariants kept) that
    claims a misclassified point is clean-correct is caught at the merge, where the clean
    bits are checked against the model itself."""
    from pagctl.checkpoint import load_checked, save_checked
    from pagctl.robustness.state import AttackState

    run = _copy(base, corpus_dir)
    argv = ["attack", run, "--attack", "fgsm", "--param", "eps=0.3", "--limit", "40",
            "--batch-size", "10", "--no-probes", "--no-progress"]
    for i in range(2):
        assert pagctl(*argv, "--shard", f"{i}/2").code == 0
    files = sorted((run / "shards").iterdir())
    loaded = [(tensors, meta) for tensors, meta in (
        load_checked(path, AttackState.METADATA_KEY, AttackState.WHAT,
                     version=AttackState.VERSION,
                     expected=json.loads(load_file_meta(path))["key"]) for path in files)]
    wrong = (loaded[0][0]["clean"] == 0).nonzero()
    if not len(wrong):
        pytest.skip("the model classifies the 40 points correctly")
    point = int(wrong[0])
    for path, (tensors, meta) in zip(files, loaded, strict=True):
        tensors["clean"][point] = 1  # claimed correct and robust, in every shard alike
        tensors["robust"][point] = 1
        meta.pop("payload_sha256")
        save_checked(path, tensors, AttackState.METADATA_KEY, meta)
    got = pagctl(*argv, "--merge-shards", "2")
    assert got.code == 2, got.stderr
    assert "classified otherwise than the model classifies them" in got.stderr


def load_file_meta(path: Path) -> str:
    """A state file's metadata JSON, as written (to read back its own key)."""
    from safetensors import safe_open

    from pagctl.robustness.state import AttackState

    with safe_open(str(path), framework="pt") as fh:
        return str(fh.metadata()[AttackState.METADATA_KEY])


def test_a_copied_report_keeps_its_digests(base: Path, corpus_dir: Path) -> None:
    """A report whose digests were swapped for the run's (a forger in Python) still meets
    the images check: the indices are the report's own."""
    run = _copy(base, corpus_dir)
    own = pg.attack(run, attack="fgsm", eps=0.1, limit=8, probes=False)
    elsewhere = pg.attack(pg.load(run), pg.dataset("digits", split_seed=3), attack="fgsm",
                          eps=0.1, indices=list(range(8, 16)), probes=False)
    assert not isinstance(own, list) and not isinstance(elsewhere, list)
    forged = replace(elsewhere, subset={**elsewhere.subset,
                                        "data_sha256": own.subset["data_sha256"]})
    with pytest.raises(PagctlError, match="indices are not the points its record names"
                       "|measured other images"):
        pg.record(run, forged)
