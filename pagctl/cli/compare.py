"""``pagctl compare``: put runs side by side from their spec.json and metrics.jsonl."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from pagctl.cli.common import DpiOpt, check_dpi, check_figure, format_help, print_envelope
from pagctl.errors import SpecError


class CompareFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"


def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run folders.")],
    fmt: Annotated[CompareFormat, typer.Option(
        "--format", help=format_help("compare"))] = CompareFormat.table,
    plot: Annotated[Path | None, typer.Option(
        "--plot", metavar="FILE", help="Write the figure, as PNG, PDF or SVG by the suffix "
        "(.png, .pdf, .svg): robust accuracy vs eps per run and attack (by run at a single "
        "eps), and alignment vs robust accuracy with Pearson's r.")] = None,
    dpi: DpiOpt = None,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Refuse numbers measured on different subsets, eps or norms "
        "(exit 2) instead of marking them.")] = False,
    against: Annotated[str | None, typer.Option(
        "--against", metavar="KEY", help="With --plot: also plot robust accuracy and "
        "alignment against this spec field (one that differs across the runs, e.g. a grid's "
        "train.pag_weight), a line per combination of the other differing fields.")] = None,
    robust_column: Annotated[str | None, typer.Option(
        "--robust-column", metavar="NAME", help="With --plot: the robust accuracy column "
        "(as compare names it, e.g. 'robust autoattack linf eps=0.03137') on the y axis of "
        "alignment vs robust accuracy and of --against. Default: the one with values in the "
        "most runs, ties to the widest spread across runs, then the largest eps.")] = None,
    weights: Annotated[str, typer.Option(
        "--weights", help="Whose results: last (the runs' model.safetensors) or best "
        "(model-best.safetensors, measured with 'attack --weights best').")] = "last",
) -> None:
    """Put runs side by side: spec differences and latest metrics (clean, robust per attack
    and eps, alignment) with n and 95% intervals, and per-example pair tests (reads no
    weights)."""
    from pagctl.compare.build import compare_runs
    from pagctl.compare.figure import check_against, check_robust_column
    from pagctl.compare.figure import plot as plot_comparison
    from pagctl.compare.rendering import render, to_json

    check_figure("--plot", plot)
    dots = check_dpi(dpi, {"--plot": plot})
    for flag, given in (("--against", against), ("--robust-column", robust_column)):
        if given is not None and plot is None:
            raise SpecError(f"{flag}: draws on the --plot figure; add --plot FILE.pdf (or "
                            ".png, .svg)")
    comparison = compare_runs(runs, strict=strict, weights=weights)
    if against is not None:
        check_against(comparison, against)
    if robust_column is not None:
        check_robust_column(comparison, robust_column)
    for line in comparison.warnings:
        typer.echo(line, err=True)
    if plot is not None:
        plot_comparison(comparison, plot, against, robust=robust_column, dpi=dots)
    if fmt is CompareFormat.json:
        print_envelope("compare", [to_json(comparison)])
    else:
        sys.stdout.write(render(comparison, fmt.value))
    if plot is not None:
        typer.echo(f"wrote {plot}", err=True)
