"""`cxrscreen models`: the registered architectures."""

from __future__ import annotations

from rich.table import Table

from cxrscreen.cli.app import app, out


@app.command()
def models() -> None:
    """List the registered architectures."""
    from cxrscreen.models.registry import available_models, get_spec

    table = Table(title="architectures")
    for col in ("name", "kind", "default size", "CAM layer"):
        table.add_column(col)
    for name in available_models():
        s = get_spec(name)
        table.add_row(name, s.kind, str(s.default_size), s.cam_layer)
    out.print(table)

