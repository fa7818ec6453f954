"""An attack's results written for others: per-example and per-class CSV, a RobustBench-style
result JSON (``pagctl attack --export DIR``); the adversarial examples themselves
(``--save-adversarial FILE``) are `pagctl.robustness.adversarial`'s.

- ``<stem>.per-example.csv``: ``index`` (in the test set), ``label``, ``clean_correct``,
  ``robust_correct`` (0/1), one row per attacked point, in attack order;
- ``<stem>.per-class.csv``: ``class``, ``name``, ``n``, ``clean_correct``,
  ``robust_correct``, ``clean_accuracy``, ``robust_accuracy``;
- ``<stem>.robustbench.json``: a RobustBench model-info entry (`robustbench_entry`), every
  field of RobustBench's ``model_info/<dataset>/<threat_model>/<name>.json``: ``link``,
  ``name``, ``authors``, ``additional_data``, ``number_forward_passes``, ``dataset``,
  ``venue``, ``architecture``, ``eps`` (a fraction string, "8/255", where it is one),
  ``clean_acc``, ``reported``, ``autoattack_acc`` (``robust_acc`` for another attack; both
  accuracies as percentage strings with two decimals, as RobustBench writes them),
  ``footnote`` and ``unreliable`` (``external`` only when given: RobustBench reads its
  absence as ``autoattack_acc``); then pagctl's own: ``threat_model`` ("Linf", "L2"), ``n``,
  the attack, its version, the reliability verdict (``reliable``) and ``evaluated_with``;

``<stem>`` is ``<attack>-<norm>-eps<ε>`` (one set per budget of a sweep). Every file is
written atomically.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:

    from pagctl.robustness.report import AttackReport

THREAT_MODELS = {"linf": "Linf", "l2": "L2", "l1": "L1"}
CARD_TEXT = ("link", "name", "authors", "venue", "architecture", "reported", "external",
             "footnote")
"""Model-card fields given as text (``reported`` and ``external`` as RobustBench writes
accuracies: percentage strings, "47.18")."""
CARD_FLAGS = ("additional_data", "unreliable")
"""Model-card fields that are true or false."""
CARD_COUNTS = ("number_forward_passes",)
CARD_KEYS = (*CARD_TEXT, *CARD_FLAGS, *CARD_COUNTS)
"""What ``--card KEY=VALUE`` may give: the model-card fields an evaluation cannot know (who
wrote the model, where, with what data), and those it decides unless told
(``name``, ``architecture``, ``number_forward_passes``, ``unreliable``)."""


def parse_card(items: list[str]) -> dict[str, Any]:
    """``--card KEY=VALUE`` items as model-card fields: text as typed, ``true``/``false``
    for `CARD_FLAGS`, a whole number ≥ 1 for ``number_forward_passes``. FieldError
    (``card``) naming the item and what it takes."""
    from pagctl.errors import FieldError

    card: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in CARD_KEYS:
            raise FieldError("card", f"'{item}' is not KEY=VALUE with KEY one of "
                             f"{', '.join(CARD_KEYS)}")
        if key in CARD_FLAGS:
            if value.strip().lower() not in ("true", "false"):
                raise FieldError("card", f"{key}: '{value}' is not true or false")
            card[key] = value.strip().lower() == "true"
        elif key in CARD_COUNTS:
            if not value.strip().isdigit() or int(value) < 1:
                raise FieldError("card", f"{key}: '{value}' is not a whole number >= 1")
            card[key] = int(value)
        else:
            card[key] = value
    return card


def forward_passes(report: AttackReport) -> int | None:
    """``number_forward_passes`` when the card does not give it: 1 for a deterministic
    model, None for a randomised one (its forwards per prediction are the model's own, which
    no evaluation sees). Randomised: the probes measured identical forwards differ
    (`pagctl.robustness.reliability.probe_randomness`), or the attack was AutoAttack 'rand'.
    Without probes the model is taken to be deterministic, as RobustBench's protocol does."""
    from pagctl.robustness.reliability import RANDOM_TOLERANCE

    spread = ((report.reliability or {}).get("probes") or {}).get("output_spread")
    randomised = report.params.get("version") == "rand" or (
        isinstance(spread, (int, float)) and spread > RANDOM_TOLERANCE)
    return None if randomised else 1


def eps_text(eps: float | None, norm: str | None, given: Any = None) -> str | None:
    """ε as RobustBench writes it: the string the user typed when it was one ("8/255"),
    else for L∞ k/255 when ε is a whole number of 255ths below 1 (to 1e-9), else the
    shortest decimal ("0.5" for L2)."""
    if isinstance(given, str):
        return given
    if eps is None:
        return None
    k = round(eps * 255)
    if norm == "linf" and 0 < k < 255 and abs(k / 255 - eps) < 1e-9:
        return f"{k}/255"
    return f"{eps:.6g}"


def stem(report: AttackReport) -> str:
    eps = "none" if report.eps is None else f"{report.eps:.6g}"
    return f"{report.attack}-{report.norm or 'none'}-eps{eps}"


def per_example_csv(report: AttackReport) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["index", "label", "clean_correct", "robust_correct"])
    for row in report.to_records():
        writer.writerow([row["index"], "" if row["label"] is None else row["label"],
                         int(row["clean_correct"]), int(row["robust_correct"])])
    return out.getvalue()


def per_class_csv(report: AttackReport, class_names: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["class", "name", "n", "clean_correct", "robust_correct", "clean_accuracy",
                     "robust_accuracy"])
    for label, c in report.per_class().items():
        name = class_names[int(label)] if int(label) < len(class_names) else label
        writer.writerow([label, name, c.n, c.clean_correct, c.robust_correct,
                         f"{c.clean_correct / c.n:.6f}", f"{c.robust_correct / c.n:.6f}"])
    return out.getvalue()


def robustbench_entry(report: AttackReport, *, name: str, dataset: str, architecture: str,
                      eps_given: Any = None,
                      card: dict[str, Any] | None = None) -> dict[str, Any]:
    """A RobustBench model-info entry for this report (see the module docstring), in
    RobustBench's order of fields. ``card`` (`parse_card`) gives what the evaluation cannot
    know (``link``, ``authors``, ``venue``, ``additional_data``, ``reported``,
    ``footnote``, ``external``; null, or absent for ``external``, when not given) and
    replaces what it decides: ``name`` (the run's), ``architecture`` (``model.arch``),
    ``number_forward_passes`` (`forward_passes`) and ``unreliable`` (the opposite of the
    probes' verdict; null without probes)."""
    from pagctl import __version__

    given = dict(card or {})
    robust_key = "autoattack_acc" if report.attack == "autoattack" else "robust_acc"
    reliable = report.reliable
    entry: dict[str, Any] = {
        "link": given.get("link"), "name": given.get("name", name),
        "authors": given.get("authors"), "additional_data": given.get("additional_data"),
        "number_forward_passes": given.get("number_forward_passes", forward_passes(report)),
        "dataset": dataset, "venue": given.get("venue"),
        "architecture": given.get("architecture", architecture),
        "eps": eps_text(report.eps, report.norm, eps_given),
        "clean_acc": f"{100 * report.clean_accuracy:.2f}", "reported": given.get("reported"),
        robust_key: f"{100 * report.robust_accuracy:.2f}"}
    if "external" in given:
        entry["external"] = given["external"]
    entry |= {
        "footnote": given.get("footnote"),
        "unreliable": given.get("unreliable", None if reliable is None else not reliable),
        "threat_model": THREAT_MODELS.get(report.norm or "", report.norm),
        "n": report.n, "attack": report.attack,
        "version": report.params.get("version"),
        "reliable": reliable, "evaluated_with": f"pagctl {__version__}"}
    return entry


def write_exports(folder: Path, reports: list[AttackReport], *, name: str, dataset: str,
                  architecture: str, class_names: list[str],
                  eps_given: Any = None, card: dict[str, Any] | None = None) -> list[Path]:
    """The CSVs and the RobustBench JSON of every report into ``folder`` (created); returns
    the files written. ``card``: the model-card fields given (`parse_card`)."""
    from pagctl.checkpoint import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for report in reports:
        base = folder / stem(report)
        given = eps_given if len(reports) == 1 else None
        for suffix, text in (
                (".per-example.csv", per_example_csv(report)),
                (".per-class.csv", per_class_csv(report, class_names)),
                (".robustbench.json", json.dumps(robustbench_entry(
                    report, name=name, dataset=dataset, architecture=architecture,
                    eps_given=given, card=card), indent=2) + "\n")):
            path = base.with_name(base.name + suffix)
            atomic_write_text(path, text)
            written.append(path)
    return written
