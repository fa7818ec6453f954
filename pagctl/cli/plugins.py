"""``pagctl plugins``: installed target-gradient sources, attacks and model providers, or
one plugin's parameters."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from pagctl.cli.common import Format, complete_plugins, format_help, print_envelope


def plugins(
    name: Annotated[str | None, typer.Argument(
        help="Show this plugin's parameters (schema, defaults, descriptions).",
        autocompletion=complete_plugins(None))] = None,
    fmt: Annotated[Format, typer.Option("--format", help=format_help("plugins"))] = \
        Format.table,
) -> None:
    """List target-gradient sources, attacks and model providers: name, kind, distribution
    and version, status (ok, broken with its error, conflict) and what each does; with NAME,
    its parameters."""
    from dataclasses import asdict

    from pagctl.registry import REGISTRIES

    if name is not None:
        _plugin_detail(name, fmt)
        return
    rows = [info for reg in REGISTRIES.values() for info in reg.info()]
    if fmt is Format.json:
        print_envelope("plugins", [asdict(r) for r in rows])
        return
    kind = {"pagctl.target_gradients": "source", "pagctl.attacks": "attack",
            "pagctl.models": "model"}
    header = ("kind", "name", "distribution", "version", "status", "description")
    cells = [(kind.get(r.group, r.group), r.name, r.distribution, r.version, r.status,
              r.summary) for r in rows]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(5)]
    for c in [header, *cells]:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(c[:5], widths, strict=True)) + "  " +
                   c[5])
    for r in rows:
        if r.error:
            typer.echo(f"{r.name} ({r.status}): {r.error}")


def _plugin_detail(name: str, fmt: Format) -> None:
    """``pagctl plugins NAME``: every group's plugin of that name, with its Params."""
    from pagctl.errors import UnknownPluginError
    from pagctl.registry import REGISTRIES

    found: list[dict[str, Any]] = []
    for reg in REGISTRIES.values():
        if name in reg.names():
            factory = reg.get(name)
            doc = (factory.__doc__ or "").strip()
            schema = factory.Params.model_json_schema() if hasattr(factory, "Params") else \
                _signature_schema(factory)
            found.append({"name": name, "group": reg.group, "provided_by": reg.origin(name),
                          "doc": doc, "params": schema})
    if not found:
        names = sorted({n for reg in REGISTRIES.values() for n in reg.names()})
        from difflib import get_close_matches

        close = get_close_matches(name, names, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UnknownPluginError(f"NAME: no plugin named '{name}'.{hint} Run 'pagctl plugins' "
                                 "to list them.")
    if fmt is Format.json:
        print_envelope("plugins", found)
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for item in found:
        kind = {"pagctl.attacks": "attack", "pagctl.models": "model provider"}.get(
            item["group"], "target-gradient source")
        console.print(f"[bold]{name}[/bold]: {kind} ({item['provided_by']}), group "
                      f"{item['group']}", soft_wrap=True)
        if item["doc"]:
            console.print(item["doc"], soft_wrap=True, markup=False)
        title = "keyword arguments (the spec's model.kwargs)" if item["group"] == \
            "pagctl.models" else "parameters (--param KEY=VALUE, or the spec's params)"
        table = Table(title=title)
        for col in ("name", "type", "default", "description"):
            table.add_column(col)
        props = item["params"].get("properties", {})
        required = set(item["params"].get("required", []))
        for key, prop in props.items():
            default = "required" if key in required else json.dumps(prop.get("default"))
            table.add_row(key, _schema_type(prop), default, prop.get("description", ""))
        if not props:
            console.print("no parameters")
        else:
            console.print(table)


def _schema_type(prop: dict[str, Any]) -> str:
    """A short type name from a JSON-schema property."""
    if "enum" in prop:
        return " | ".join(json.dumps(v) for v in prop["enum"])
    if "const" in prop:
        return json.dumps(prop["const"])
    if "anyOf" in prop:
        return " | ".join(_schema_type(p) for p in prop["anyOf"])
    kind = prop.get("type", "any")
    return str(kind)


def _signature_schema(factory: Any) -> dict[str, Any]:
    """A JSON-schema-like view of a model provider's keyword arguments (its signature)."""
    import inspect

    props: dict[str, Any] = {}
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return {"properties": props}
    for pname, param in signature.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = param.default
        props[pname] = {"default": default if isinstance(default, (int, float, str, bool,
                                                                   type(None))) else repr(default)}
    return {"properties": props}
