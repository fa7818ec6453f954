"""Side-by-side summary of run folders from spec.json and metrics.jsonl (never weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pagctl import checkpoint


def _attack_key(rec: dict[str, Any]) -> str:
    params = rec.get("params", {})
    eps = params.get("eps")
    return f"{rec.get('attack')} eps={eps:g}" if isinstance(eps, (int, float)) else \
        str(rec.get("attack"))


def compare_runs(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """One row per run: its key spec fields, latest training metrics and latest result of
    each (attack, eps) with n."""
    rows = []
    for run_dir in run_dirs:
        spec = checkpoint.read_spec(run_dir)
        metrics = checkpoint.read_metrics(run_dir)
        epochs = [m for m in metrics if m.get("kind") == "train_epoch"]
        last = epochs[-1] if epochs else {}
        row: dict[str, Any] = {
            "run": spec.name, "run_dir": str(run_dir), "arch": spec.model.arch,
            "source": spec.target_gradients.name,
            "lambda": spec.train.pag_weight if spec.target_gradients.name != "none" else 0.0,
            "K": spec.train.classes_per_image, "epochs": last.get("epoch"),
            "clean_accuracy": last.get("clean_accuracy"), "alignment": last.get("alignment"),
            "n_test": last.get("n_test"), "attacks": {},
        }
        for rec in metrics:
            if rec.get("kind") == "attack":
                row["attacks"][_attack_key(rec)] = {
                    "clean_accuracy": rec.get("clean_accuracy"),
                    "robust_accuracy": rec.get("robust_accuracy"), "n": rec.get("n")}
        rows.append(row)
    return rows


def render_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    attack_keys = sorted({k for r in rows for k in r["attacks"]})
    table = Table(title="pagctl compare")
    table.add_column("run", no_wrap=True, min_width=max([3, *(len(r["run"]) for r in rows)]))
    table.add_column("source", no_wrap=True,
                     min_width=max([6, *(len(r["source"]) for r in rows)]))
    for col in ["λ", "clean", "align", *(k.replace(" ", "\n") for k in attack_keys)]:
        table.add_column(col, justify="right", min_width=max(len(p) for p in col.split("\n")))
    sizes = set()
    for r in rows:
        cells = [r["run"], r["source"], f"{r['lambda']:g}",
                 "-" if r["clean_accuracy"] is None else f"{r['clean_accuracy']:.3f}",
                 "-" if r["alignment"] is None else f"{r['alignment']:.3f}"]
        for k in attack_keys:
            a = r["attacks"].get(k)
            cells.append("-" if a is None else f"{a['robust_accuracy']:.3f}")
            if a is not None:
                sizes.add(a["n"])
        table.add_row(*cells)
    console = Console()
    console.print(table)
    if sizes:
        console.print(f"robust accuracy on n = {', '.join(str(n) for n in sorted(sizes))} "
                      "test images; clean and align from the last training epoch", soft_wrap=True)
