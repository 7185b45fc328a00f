"""mkdocs hooks that generate reference text from the code, so that it cannot drift from it.

* ``<!-- cli-reference -->`` becomes the reference of every ``cellmorph`` command, read from the typer
  app (``cellmorph.cli.app``): usage, arguments, options with their help and defaults.
* ``<!-- fields: module.Class -->`` becomes a table of a settings record's fields (pydantic: name, type,
  default, description).
* ``<!-- include: path -->`` inserts a file of the repository (path relative to ``mkdocs.yml``), so
  ``benchmarks/RESULTS.md`` is shown as it is, without a copy.
* Sphinx roles in docstrings (``:func:`x```, ``:class:`~a.b.C```) are shown as code.

Every generator raises on failure, so a broken app or record fails ``mkdocs build`` instead of leaving a
hole in the site.
"""

from __future__ import annotations

import html
import importlib
import re
from pathlib import Path

CLI_MARK = re.compile(r"^<!-- cli-reference -->$", re.M)
FIELDS_MARK = re.compile(r"^<!-- fields: ([\w.]+) -->$", re.M)
INCLUDE_MARK = re.compile(r"^<!-- include: (\S+) -->$", re.M)
ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):(?=<code>)")
SHORTENED = re.compile(r"<code>~(?:\w+\.)*(\w+)</code>")
LITERAL_INTRO = re.compile(r"::</p>")


def on_page_markdown(markdown: str, page, config, files) -> str:
    root = Path(config["config_file_path"]).parent
    markdown = INCLUDE_MARK.sub(lambda m: _include(root, m.group(1)), markdown)
    markdown = CLI_MARK.sub(lambda m: cli_reference(), markdown)
    return FIELDS_MARK.sub(lambda m: fields_table(m.group(1)), markdown)


def on_page_content(content: str, page, config, files) -> str:
    content = ROLE.sub("", content)
    content = SHORTENED.sub(r"<code>\1</code>", content)
    return LITERAL_INTRO.sub(":</p>", content)


def _include(root: Path, name: str) -> str:
    path = (root / name).resolve()
    if not path.is_relative_to(root.resolve()) or not path.is_file():
        raise FileNotFoundError(f"<!-- include: {name} -->: no such file in the repository")
    return path.read_text(encoding="utf-8")


def _text(value: str) -> str:
    """Help text as Markdown that shows it literally, on one line; `backticked` spans stay code."""
    pieces = re.split(r"(`[^`]+`)", " ".join(value.split()))
    return "".join(piece if piece.startswith("`") and piece.endswith("`") and len(piece) > 1
                   else re.sub(r"([\\*_\[\]`])", r"\\\1", html.escape(piece, quote=False))
                   for piece in pieces)


# ------------------------------------------------------------------------------------------------ CLI
def _first_paragraph(text: str | None) -> str:
    return (text or "").strip().split("\n\n")[0]


def _anchor(path: list[str]) -> str:
    return "-".join(path) or "cellmorph"


def cli_reference() -> str:
    """Every command of the typer app, walked by what the commands have (typer carries its own click)."""
    import typer

    from cellmorph.cli import app

    root = typer.main.get_command(app)
    parts: list[str] = []

    def walk(cmd, ctx, path: list[str]) -> None:
        level = "#" * min(2 + max(len(path) - 1, 0), 4)
        parts.append(f"{level} `{' '.join(['cellmorph', *path])}` {{#{_anchor(path)}}}\n")
        if cmd.help:
            parts.append(_text(cmd.help) + "\n")
        parts.append(f"```text\n{cmd.get_usage(ctx)}\n```\n")
        arguments, options = [], []
        for param in cmd.get_params(ctx):
            is_argument = param.param_type_name == "argument"
            record = param.get_help_record(ctx)
            if record is None:
                if is_argument:
                    arguments.append((param.human_readable_name, ""))
                continue
            (arguments if is_argument else options).append(record)
        for heading, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                parts.append(f"**{heading}**\n")
                parts.append("\n".join(f"* `{name}`" + (f": {_text(text)}" if text else "")
                                       for name, text in rows) + "\n")
        names = cmd.list_commands(ctx) if hasattr(cmd, "list_commands") else []
        if names:
            parts.append("**Commands**\n")
            parts.append("\n".join(f"* [`{name}`](#{_anchor([*path, name])}): "
                                   f"{_text(_first_paragraph(cmd.get_command(ctx, name).help))}"
                                   for name in names) + "\n")
        for name in names:
            sub = cmd.get_command(ctx, name)
            walk(sub, sub.context_class(sub, info_name=name, parent=ctx), [*path, name])

    walk(root, root.context_class(root, info_name="cellmorph"), [])
    if sum(part.startswith("#") for part in parts) < 10:
        raise RuntimeError("the CLI reference lists fewer than 10 commands: did the typer app change shape?")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------- settings
def _type_name(annotation) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    text = re.sub(r"\b(?:typing|pathlib|cellmorph(?:\.\w+)*)\.", "", str(annotation)).replace("NoneType", "None")
    # Constrained items (Annotated[int, FieldInfo(... Ge(ge=1) ...)]) read as their base type.
    return re.sub(r"Annotated\[(\w+), FieldInfo\([^\]]*\]\)\]", r"\1", text)


def _cell(value: str, code: bool = False) -> str:
    """A table cell: ``code`` as an HTML code element (a pipe inside Markdown backticks would split the row)."""
    if code:
        return "<code>" + html.escape(" ".join(str(value).split()), quote=False).replace("|", "&#124;") + "</code>"
    return _text(str(value)).replace("|", "\\|")


def fields_table(dotted: str) -> str:
    from pydantic_core import PydanticUndefined

    module, _, name = dotted.rpartition(".")
    record = getattr(importlib.import_module(module), name)
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for field_name, field in record.model_fields.items():
        if field.default_factory is not None:
            default = repr(field.default_factory())
        elif field.default is PydanticUndefined:
            default = "required"
        else:
            default = repr(field.default)
        if len(default) > 60:
            default = default[:57] + "…"
        rows.append(f"| `{field_name}` | {_cell(_type_name(field.annotation), True)} | {_cell(default, True)} "
                    f"| {_cell(field.description or '')} |")
    if len(rows) == 2:
        raise ValueError(f"{dotted}: a settings record without fields")
    return "\n".join(rows) + "\n"
