"""`--help` laid out for an 80-column terminal: options under their panels, every name whole.

Rich's option table gives each column a share of the width and cuts what does not fit
(`--gradient-accumula…`), so with sixty options nothing could be read at 80 columns. Here
click's own layout is used instead (names in full, help wrapped beside or below them), with
Typer's `rich_help_panel` of each option as its section.
"""

from __future__ import annotations

import re

import click
from typer.core import TyperCommand

_MARKUP = re.compile(r"\[/?(dim|bold|green|red|yellow|cyan)?\]")


def plain(text: str) -> str:
    """Help text without Rich markup (`[dim]…[/]`; `\\[` is a literal bracket)."""
    return _MARKUP.sub("", text).replace("\\[", "[")


def with_default(param: click.Parameter, help_text: str) -> str:
    """`help_text` ending with the option's default when it does not state one already: a
    switch's on/off, or none for an option that is not required."""
    said = "[default:" in help_text or "default:" in help_text.lower() \
        or "(default" in help_text.lower() or "[required]" in help_text
    if said or "--help" in getattr(param, "opts", ()):
        return help_text
    if getattr(param, "is_flag", False) and not getattr(param, "secondary_opts", None):
        return f"{help_text} [default: {'on' if param.default else 'off'}]"
    return f"{help_text} [default: none]"


class PanelledCommand(TyperCommand):
    """A Typer command whose `--help` is click's layout, grouped by help panel."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.width = min(formatter.width or 80, 100)
        self.format_usage(ctx, formatter)
        self.format_help_text(ctx, formatter)
        self.format_options(ctx, formatter)
        self.format_epilog(ctx, formatter)

    def format_help_text(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        if self.help:
            formatter.write_paragraph()
            with formatter.indentation():
                formatter.write_text(plain(self.help))

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            names, help_text = record
            if param.param_type_name == "argument":
                section = "Arguments"
            else:
                section = getattr(param, "rich_help_panel", None) or "Options"
                help_text = with_default(param, plain(help_text))
            sections.setdefault(section, []).append((names, help_text))
        for section, rows in sections.items():
            with formatter.section(section):
                formatter.write_dl(rows, col_max=34)

