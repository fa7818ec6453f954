"""``pagctl import``: a model pagctl did not train, written as a run folder that every other
command reads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from pagctl.cli.common import (
    DataDirOpt,
    DeviceOpt,
    Format,
    OverwriteOpt,
    RunOutOpt,
    SetOpt,
    TrustCodeOpt,
    cell_text,
    format_help,
    print_envelope,
    print_table,
)
from pagctl.errors import SpecError


def _floats(option: str, text: str | None) -> list[float] | None:
    """``0.5,0.5,0.5`` as floats; SpecError naming ``option`` otherwise."""
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SpecError(f"{option}: '{text}' is not a comma-separated list of numbers, e.g. "
                        "0.4914,0.4822,0.4465") from None


def import_model(
    spec: Annotated[str | None, typer.Argument(
        help="Optional spec (file or built-in name) whose model and data describe the "
        "model; --model and --dataset replace them.")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Architecture: a timm name, a model provider (pagctl plugins), "
        "package.module:factory returning an nn.Module that takes [0, 1] pixels, or "
        "robustbench:NAME, a RobustBench zoo entry (with --threat-model; weights from "
        "--model-dir).")] = None,
    threat_model: Annotated[str | None, typer.Option(
        "--threat-model", help="robustbench: models: the zoo's threat model, Linf or L2 "
        "(default Linf); the zoo's dataset is --dataset.")] = None,
    model_dir: Annotated[Path | None, typer.Option(
        "--model-dir", help="robustbench: models: RobustBench's cache, holding "
        "DATASET/THREAT_MODEL/NAME.pt (default ./models); never downloaded.")] = None,
    checkpoint: Annotated[Path | None, typer.Option(
        "--checkpoint", "-c", help="Weights: safetensors, or a pickle (.pt/.pth) with "
        "--trust-pickle. Without it, the factory's own weights.")] = None,
    trust_pickle: Annotated[bool, typer.Option(
        "--trust-pickle", help="Allow a pickle checkpoint (unpickling can run code; read "
        "with torch.load(weights_only=True)).")] = False,
    dataset: Annotated[str | None, typer.Option(
        "--dataset", help="Dataset to evaluate on (sets data.dataset), e.g. cifar10, "
        "digits, imagefolder, or tensors: your own .safetensors/.npz file of x and y given "
        "as --data-dir.")] = None,
    mean: Annotated[str | None, typer.Option(
        "--mean", help="Per-channel normalisation mean in front of the network, e.g. "
        "0.4914,0.4822,0.4465. Default: none for package.module:factory, timm's pretrained "
        "config for a timm name, else the dataset's.")] = None,
    std: Annotated[str | None, typer.Option(
        "--std", help="Per-channel normalisation std (with --mean).")] = None,
    set_: SetOpt = [],  # noqa: B006 - typer needs a literal default
    data_dir: DataDirOpt = None,
    download: Annotated[bool, typer.Option(
        "--download", help="Allow the network: torchvision downloads the dataset into "
        "--data-dir, timm fetches pretrained weights (model.kwargs.pretrained, hf-hub:).")
    ] = False,
    out: RunOutOpt = None,
    overwrite: OverwriteOpt = False,
    trust_code: TrustCodeOpt = False,
    device: DeviceOpt = "auto",
    fmt: Annotated[Format, typer.Option("--format", help=format_help("import"))] = \
        Format.table,
) -> None:
    """Bring in a model pagctl did not train: write a run folder (spec, weights, config,
    an import record) that attack, align-score and compare read like a trained run's."""
    # --download as pagctl train has it (data.download): importing a published model
    # (hf-hub:, model.kwargs.pretrained) or evaluating it on a torchvision dataset needs the
    # network as training does, and the refusal without it names the same flag for both.
    from pagctl import spec as specmod
    from pagctl.importing import import_model, import_spec
    from pagctl.robustbench_zoo import is_zoo_name, zoo_kwargs
    from pagctl.trust import CodeTrust, named_architectures

    if spec is None and (model is None or dataset is None):
        raise SpecError("import: give --model and --dataset (or a spec whose model and data "
                        "describe the model); see 'pagctl import --help'")
    if (mean is None) != (std is None):
        raise SpecError(f"{'--std' if mean is not None else '--mean'}: give --mean and --std "
                        "together")
    values: dict[str, Any] = {}
    if model is not None:
        values["model.arch"] = model
    if model is not None and is_zoo_name(model) and dataset is not None:
        # key by key: a --set model.kwargs.dataset (the zoo's, for your own data) stays
        values.update({f"model.kwargs.{k}": v for k, v in zoo_kwargs(dataset, threat_model)
                       .items()})
    elif threat_model is not None:
        raise SpecError("--threat-model: names a RobustBench zoo entry's threat model; give it "
                        "with --model robustbench:NAME and --dataset")
    if dataset is not None:
        values["data.dataset"] = dataset
    for option, key, text in (("--mean", "model.mean", mean), ("--std", "model.std", std)):
        parsed = _floats(option, text)
        if parsed is not None:
            values[key] = parsed
    if data_dir is not None:
        values["data.root"] = data_dir
    if download:
        values["data.download"] = True
    if out is not None:
        values["out_dir"] = out
    base = specmod.read_run_spec_mapping(spec)[0] if spec is not None else None
    run_spec = import_spec(base, values, checkpoint=checkpoint, overrides=set_)
    arch = run_spec.model.arch
    named = named_architectures(set_) | ({model} if model is not None else set())
    result = import_model(run_spec, checkpoint, trust_pickle=trust_pickle, overwrite=overwrite,
                          device=device, trust=CodeTrust.of(trust_code, named),
                          model_dir=model_dir)
    summary = {"run_dir": str(result.run_dir), **result.record}
    for line in result.warnings:  # the check looks wrong: stderr, whatever the format
        typer.echo(line, err=True)
    if fmt is Format.json:
        print_envelope("import", [summary])
        return
    rows = [(k, cell_text(summary[k])) for k in (
        "run_dir", "arch", "checkpoint", "checkpoint_sha256", "format", "container",
        "stripped_prefix", "normalisation", "resize", "mean", "std", "n_check",
        "check_accuracy", "zoo")
        if summary.get(k) is not None]
    print_table(f"imported {arch}", rows)
    typer.echo(f"next: pagctl attack {result.run_dir} --attack autoattack", err=True)
