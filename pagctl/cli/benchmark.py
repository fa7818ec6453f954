"""``pagctl benchmark``: RobustBench's protocol on a run folder, as ``pagctl attack`` with the
protocol's settings fixed.

RobustBench's ``benchmark()`` (robustbench/eval.py) evaluates the first ``n_examples``
test points (10,000 by default: the whole CIFAR-10/100 test set) with AutoAttack 'standard'
at ε = 8/255 (L∞) or 0.5 (L2), the budgets of its CIFAR leaderboards. This command is that
protocol and nothing else: it calls ``pagctl attack`` with ``--attack autoattack --param
eps=… --param norm=… --param version=standard --limit N`` and its ``--export``, so the
evaluation, the record and the files are the attack command's own. It is a command, not a
recipe, so that the protocol's settings cannot drift from RobustBench's by a typo: ε, the norm
and the version are not options, and a dataset RobustBench has no CIFAR leaderboard for is
refused. Weaker settings for a quick look (``--param steps=…``, ``square_queries=…``) are
accepted, warned about, and kept in the record and the export's params. It prints the
attack command's table; its machine-readable result is the exported JSON (and the record),
so it has no ``--format``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pagctl.cli.common import (
    DataDirOpt,
    DeviceOpt,
    ProgressOpt,
    RecordOpt,
    TrustCodeOpt,
    WeightsOpt,
)
from pagctl.errors import SpecError

EPS = {"Linf": "8/255", "L2": "0.5"}
"""RobustBench's budgets for its CIFAR-10/100 leaderboards."""
DATASETS = ("cifar10", "cifar100")
N_EXAMPLES = 10_000
"""RobustBench's ``benchmark(n_examples=10000)``: the whole CIFAR test set."""
FIXED = ("eps", "norm", "version")
"""AutoAttack's params the protocol sets: not to be given with --param."""


def benchmark(
    run: Annotated[Path, typer.Argument(
        help="Run folder written by 'pagctl train' or 'pagctl import' (cifar10 or cifar100).",
        metavar="RUN")],
    threat_model: Annotated[str, typer.Option(
        "--threat-model", help="Linf (eps 8/255) or L2 (eps 0.5).")] = "Linf",
    n: Annotated[int, typer.Option(
        "--n", min=1, help="The first N test points (RobustBench: 10000, the whole test "
        "set).")] = N_EXAMPLES,
    export: Annotated[Path, typer.Option(
        "--export", help="Folder for the RobustBench model-info JSON and the per-example and "
        "per-class CSVs.")] = Path("benchmark"),
    card: Annotated[list[str], typer.Option(
        "--card", help="A model-card field of the JSON, KEY=VALUE; repeatable (link, name, "
        "authors, venue, architecture, reported, external, footnote, additional_data, "
        "unreliable, number_forward_passes).")] = [],  # noqa: B006 - typer needs a literal
    param: Annotated[list[str], typer.Option(
        "--param", "-p", help="AutoAttack parameter KEY=VALUE besides eps, norm and version, "
        "e.g. steps=10 for a quick, weaker look (warned about; recorded).")] = [],  # noqa: B006
    batch_size: Annotated[int, typer.Option("--batch-size", min=1,
                                            help="Images per attack batch.")] = 256,
    state: Annotated[Path | None, typer.Option(
        "--state", help="Progress file: written after every batch, read to resume.")] = None,
    progress: ProgressOpt = True,
    keep_record: RecordOpt = True,
    weights: WeightsOpt = "last",
    trust_code: TrustCodeOpt = False,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
) -> None:
    """RobustBench's protocol: AutoAttack 'standard' on the first N test points at eps 8/255
    (Linf) or 0.5 (L2), written as RobustBench's model-info JSON (with the --card fields)
    and recorded as 'pagctl attack' records it."""
    from pagctl.checkpoint import read_spec
    from pagctl.cli.attack import attack

    if threat_model not in EPS:
        raise SpecError(f"--threat-model: '{threat_model}' is not one of {', '.join(EPS)}")
    fixed = [p for p in param if p.partition("=")[0].strip() in FIXED]
    if fixed:
        raise SpecError(f"--param: '{fixed[0]}' is set by the protocol (eps, norm and version "
                        "are RobustBench's); for other settings use 'pagctl attack'")
    if run.is_dir():
        dataset = read_spec(run).data.dataset
        if dataset not in DATASETS:
            raise SpecError(f"{run}: evaluated on {dataset}, but RobustBench's protocol is "
                            f"defined for {', '.join(DATASETS)}; use 'pagctl attack' instead")
    weaker = [p for p in param if p.partition("=")[0].strip() in ("steps", "square_queries")]
    if weaker:
        typer.echo(f"warning: {', '.join(weaker)} is weaker than RobustBench's protocol; the "
                   "result is not comparable to its leaderboard", err=True)
    attack([run], attack_name="autoattack",
           param=[f"eps={EPS[threat_model]}", f"norm={threat_model.lower()}",
                  "version=standard", *param],
           limit=n, batch_size=batch_size, export=export, card=card, state=state,
           progress=progress, keep_record=keep_record, weights=weights,
           trust_code=trust_code, device=device, data_dir=data_dir)
