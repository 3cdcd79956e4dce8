"""``finebench models``: the backbones, a backbone's taps or the methods, as a table or JSON."""

from __future__ import annotations

import dataclasses
import json

import typer
from rich.table import Table

from finebench.console import make_console
from finebench.methods import list_methods
from finebench.models import list_backbones
from finebench.models.registry import list_taps
from finebench.terminal import backbones_table, taps_table


def print_models(*, taps: str | None, methods: bool, json_output: bool) -> None:
    """The listing the flags ask for: one backbone's taps (``taps``), the methods, else the backbones."""
    if taps is not None:
        print_taps(taps, json_output)
        return
    if methods:
        print_methods(json_output)
        return
    infos = list_backbones()
    if json_output:
        typer.echo(json.dumps([dataclasses.asdict(info) for info in infos], indent=2))
        return
    make_console().print(backbones_table(infos))
    make_console().print("Any timm or torchvision CNN works too: timm:<name>, torchvision:<name> (see --taps NAME).")


def print_methods(json_output: bool) -> None:
    """Each method (a recipe's ``variants.kind``) with its options' defaults and its passes."""
    infos = list_methods()
    if json_output:
        typer.echo(json.dumps(infos, indent=2))
        return
    table = Table(title="finebench methods (a recipe's variants.kind; options with their defaults)")
    for column in ("kind", "options", "test passes", "train passes"):
        table.add_column(column, justify="right" if "passes" in column else "left", overflow="fold")
    for info in infos:
        options = " ".join(f"{k}={v!r}" for k, v in info["options"].items()) or "-"
        table.add_row(f"{info['kind']}\n[dim]{info['description']}[/]", options, str(info["test_forward_passes"]),
                      str(info["train_passes_per_image"]))
    make_console().print(table)


def print_taps(name: str, json_output: bool) -> None:
    """One backbone's tap points: where a method can read its feature maps."""
    listing = list_taps(name)
    if json_output:
        typer.echo(json.dumps(dataclasses.asdict(listing), indent=2))
        return
    make_console().print(taps_table(name, listing))
