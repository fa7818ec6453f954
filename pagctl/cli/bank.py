"""``pagctl bank``: precompute a target-gradient source into a safetensors bank."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from pagctl.cli.common import (
    DataDirOpt,
    DeviceOpt,
    Format,
    QuietOpt,
    SetOpt,
    cell_text,
    complete_plugins,
    format_help,
    parse_params,
    plugin_params,
    print_envelope,
    print_table,
)
from pagctl.errors import SpecError


class BankDtype(str, Enum):
    float16 = "float16"
    float32 = "float32"


def bank(
    source_name: Annotated[str, typer.Argument(
        help="Target-gradient source to precompute (pagctl plugins).",
        autocompletion=complete_plugins("target_gradients"))],
    spec: Annotated[str, typer.Option(
        "--spec", help="Run spec (file or built-in name) whose training data the bank is "
        "for.")],
    out: Annotated[Path, typer.Option("--out", help="Bank file to write (.safetensors).")],
    param: Annotated[list[str], typer.Option(
        "--param", "-p", help="Source parameter KEY=VALUE; repeatable. When SOURCE is the "
        "spec's own target_gradients source, its params there are the starting point.")] = [],  # noqa: B006,E501
    set_: SetOpt = [],  # noqa: B006 - typer needs a literal default
    dtype: Annotated[BankDtype, typer.Option("--dtype", help="Storage dtype.")] =
    BankDtype.float16,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1,
                                            help="Images per source call.")] = 256,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted bank "
                                         "(finished chunks are kept).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing "
                                            "bank.")] = False,
    seed: Annotated[int | None, typer.Option(
        "--seed", min=0, max=2**32 - 1, help="Seed passed to the source (default: the "
        "spec's train.seed, as in training).")] = None,
    quiet: QuietOpt = False,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    fmt: Annotated[Format, typer.Option(
        "--format", help=format_help("bank", "Summary format"))] = Format.table,
) -> None:
    """Precompute a source's target gradients for every training image and class into a
    safetensors bank, served during training by the 'precomputed' source."""
    from pagctl import registry
    from pagctl import spec as specmod
    from pagctl.banks import write_bank
    from pagctl.build import build_context, default_cache_dir, resolve_device
    from pagctl.data import load_data

    given = parse_params(param, "--param")
    if out.suffix != ".safetensors":
        raise SpecError("--out: a bank is a .safetensors file; give a name ending in "
                        ".safetensors")
    from pagctl.checkpoint import check_output

    check_output("--out", out)
    run_spec = specmod.load_spec(spec, set_,
                                 {"data.root": data_dir} if data_dir is not None else None)
    if run_spec.target_gradients.name == source_name:
        # the bank stands in for the spec's own source: start from its parameters
        given = {**run_spec.target_gradients.params, **given}
    params = plugin_params("target_gradients", source_name, given, "SOURCE")
    dev = resolve_device(device)
    bundle = load_data(run_spec.data)
    ctx = build_context(bundle, dev, run_spec.train.seed if seed is None else seed,
                        default_cache_dir())
    source = registry.target_gradients.instantiate(source_name, params, ctx, "SOURCE")
    info = write_bank(source, bundle.train, out, num_classes=bundle.num_classes,
                      batch_size=batch_size, dtype=dtype.value, device=dev,
                      progress=not quiet, resume=resume, overwrite=overwrite,
                      source_name=source_name, source_params=params.model_dump(mode="json"),
                      data_fingerprint=bundle.fingerprint)
    record = info.to_record()
    if fmt is Format.json:
        print_envelope("bank", [record])
        return
    print_table(f"bank {out}", [(k, cell_text(v) if not isinstance(v, (dict, list))
                                   else json.dumps(v)) for k, v in record.items()])
