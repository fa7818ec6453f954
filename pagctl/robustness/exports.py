"""An attack's results written for others: per-example and per-class CSV, a RobustBench-style
result JSON (``pagctl attack --export DIR``); the adversarial examples themselves
(``--save-adversarial FILE``) are `pagctl.robustness.adversarial`'s.

- ``<stem>.per-example.csv``: ``index`` (in the test set), ``label``, ``clean_correct``,
  ``robust_correct`` (0/1), one row per attacked point, in attack order;
- ``<stem>.per-class.csv``: ``class``, ``name``, ``n``, ``clean_correct``,
  ``robust_correct``, ``clean_accuracy``, ``robust_accuracy``;
- ``<stem>.robustbench.json``: the fields of a RobustBench model entry that an evaluation
  fills (``clean_acc`` and ``autoattack_acc`` as percentage strings with two decimals, as
  RobustBench writes them; ``robust_acc`` for another attack), with ``eps`` as a fraction
  string ("8/255") where it is one, ``threat_model`` ("Linf", "L2"), ``n``, the attack, its
  version, and the reliability verdict;

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
                      eps_given: Any = None) -> dict[str, Any]:
    """A RobustBench-style result entry for this report (see the module docstring)."""
    from pagctl import __version__

    robust_key = "autoattack_acc" if report.attack == "autoattack" else "robust_acc"
    entry: dict[str, Any] = {
        "name": name, "dataset": dataset, "architecture": architecture,
        "threat_model": THREAT_MODELS.get(report.norm or "", report.norm),
        "eps": eps_text(report.eps, report.norm, eps_given),
        "clean_acc": f"{100 * report.clean_accuracy:.2f}",
        robust_key: f"{100 * report.robust_accuracy:.2f}",
        "n": report.n, "attack": report.attack,
        "version": report.params.get("version"),
        "reliable": report.reliable, "evaluated_with": f"pagctl {__version__}"}
    return entry


def write_exports(folder: Path, reports: list[AttackReport], *, name: str, dataset: str,
                  architecture: str, class_names: list[str],
                  eps_given: Any = None) -> list[Path]:
    """The CSVs and the RobustBench JSON of every report into ``folder`` (created); returns
    the files written."""
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
                    eps_given=given), indent=2) + "\n")):
            path = base.with_name(base.name + suffix)
            atomic_write_text(path, text)
            written.append(path)
    return written
