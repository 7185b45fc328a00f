"""``cellmorph weights``: list, verify and import ImageNet weights (offline unless --online).

Mounted by the main CLI as ``app.add_typer(weights_app, name="weights")``; also works on its own.
Heavy imports (torch, timm) happen inside the commands so that ``cellmorph --help`` stays fast.

Exit codes: 0 ok, 1 verification failed (implausible predictions), 2 user error (one ``error:`` line).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from cellmorph.errors import CellmorphError

weights_app = typer.Typer(
    help="Offline-first ImageNet weights: list, verify, import.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _fail(exc: CellmorphError) -> typer.Exit:
    sys.stderr.write(f"error: {exc}\n")
    return typer.Exit(getattr(exc, "exit_code", 2))


@weights_app.command("list")
def list_command(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="also print the file path and notes"),
) -> None:
    """One line per backbone: NAME SOURCE SHA256-PREFIX (source: path/cache/package/hub/none)."""
    try:
        from cellmorph.models.weights import list_weights

        statuses = list_weights()
    except CellmorphError as exc:
        raise _fail(exc) from None
    width = max([22] + [len(s.name) for s in statuses])
    for s in statuses:
        line = s.line(width)
        if verbose:
            line += f"  {s.path or '-'}" + (f"  # {s.note}" if s.note else "")
        typer.echo(line)


@weights_app.command("verify")
def verify_command(
    name: str = typer.Argument(..., help="timm model name, e.g. tf_efficientnet_lite0"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="use this weights file"),
    online: bool = typer.Option(False, "--online", help="allow downloading from the hub if nothing local"),
) -> None:
    """Classify scikit-image's coffee and cat photos with the ImageNet head; exit 0 if plausible."""
    try:
        from cellmorph.models.weights import verify_weights

        result = verify_weights(name, weights=weights, allow_network=online)
    except CellmorphError as exc:
        raise _fail(exc) from None
    r = result.resolved
    typer.echo(f"{r.describe()}; input {r.input_size}px, mean {list(r.mean)}, std {list(r.std)}")
    for check in result.checks:
        typer.echo(f"{check.image}:")
        for rank, (idx, label, prob) in enumerate(check.top5, 1):
            typer.echo(f"  {rank}. {label} [{idx}]  {prob:.4f}")
    failed = [c for c in result.checks if not c.passed]
    for c in result.checks:
        _, label, prob = c.top1
        mark = "ok" if c.passed else "FAIL"
        typer.echo(f"{mark}: {c.image} top-1 {label!r} ({prob:.3f}); expected {c.expected}")
    if failed:
        sys.stderr.write(
            f"error: {name}: implausible ImageNet predictions for {', '.join(c.image for c in failed)}; "
            f"the weights ({r.path}) do not fit this model or its preprocessing\n"
        )
        raise typer.Exit(1)
    typer.echo(f"{name}: weights verified")


@weights_app.command("import")
def import_command(
    path: Path = typer.Argument(..., help="state dict file (.pth/.pt/.bin/.ckpt, or .safetensors)"),
    model: str = typer.Option(..., "--model", help="timm model name the weights belong to"),
) -> None:
    """Register a state dict obtained elsewhere in the cache (sha256 manifest) after checking it fits."""
    try:
        from cellmorph.models.weights import import_weights, sha256_file

        dest = import_weights(path, model)
        digest = sha256_file(dest)
    except CellmorphError as exc:
        raise _fail(exc) from None
    typer.echo(f"{model}  cache  {digest[:12]}  {dest}")


if __name__ == "__main__":  # pragma: no cover
    weights_app()
