"""Typer's commands with the help conventions users of other CLIs expect: a flag shows no
``<bool>`` type, an argument its NAME, a usage line ``RECIPE`` / ``[PATHS]...`` (click's), not ``{recipe}``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer
import typer.core


def _follow_conventions(params: list[Any]) -> None:
    """Help as users of other CLIs expect it: a flag shows no ``<bool>`` type, an argument its NAME."""
    for param in params:
        if param.param_type_name == "option" and getattr(param, "is_bool_flag", False) and param.metavar is None:
            param.metavar = ""
        elif param.param_type_name == "argument" and param.metavar is None:
            param.metavar = (param.name or "").upper()


class _Conventional:
    """Mixin for a Typer command or group: its parameters, help option included, follow the conventions."""

    params: list[Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _follow_conventions(self.params)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        _follow_conventions([option] if option is not None else [])
        return option


class ConventionalCommand(_Conventional, typer.core.TyperCommand):
    """A Typer command whose usage line reads ``RECIPE`` / ``[PATHS]...`` (click's convention), not ``{recipe}``."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, typer.core.TyperArgument):
                name = param.metavar or (param.name or "").upper()
                pieces.append((name if param.required else f"[{name}]") + ("..." if param.nargs != 1 else ""))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


class ConventionalGroup(_Conventional, typer.core.TyperGroup):
    pass


class FinebenchApp(typer.Typer):
    """Every command, also ones added later, gets ``ConventionalCommand``."""

    def command(
        self, *args: Any, cls: type[typer.core.TyperCommand] | None = None, **kwargs: Any
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return super().command(*args, cls=cls or ConventionalCommand, **kwargs)
