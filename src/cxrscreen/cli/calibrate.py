"""`cxrscreen calibrate`: temperature scaling and a COVID operating point for a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from cxrscreen.cli.app import _fail, _shown, app, console, out
from cxrscreen.errors import CXRError
from cxrscreen.evaluation.formatting import format_ci, format_value
from cxrscreen.runs.decision import DecisionRule


@app.command()
def calibrate(
    model: Annotated[Path, typer.Option(help="run directory to calibrate (its config.json is updated)")],
    data: Annotated[Path, typer.Option(help="manifest folder")],
    split: Annotated[Path, typer.Option(help="split CSV: fitted on val, reported on test")],
    target_sensitivity: Annotated[float, typer.Option(help="COVID sensitivity to reach on val")] = 0.95,
    n_boot: Annotated[int, typer.Option(help="bootstrap resamples for the test CIs")] = 1000,
) -> None:
    """Fit temperature scaling and the COVID operating point on val, report on test, store both in the run."""
    from cxrscreen.evaluation.calibration import calibrate_run

    try:
        result = calibrate_run(model, data, split, target_sensitivity=target_sensitivity, n_boot=n_boot)
    except CXRError as exc:
        _fail(exc)
    cal, op = result["calibration"], result["operating_point"]

    num = format_value

    table = Table(title=escape(f"calibration of {_shown(model)} (T = {cal['temperature']:.3f}, fitted on val)"))
    for col in ("subset", "n", "ECE before", "ECE after", "NLL before", "NLL after"):
        table.add_column(col, justify="right" if col != "subset" else "left")
    for name in ("val", "test"):
        r = result[name]
        if r is not None:
            table.add_row(name, str(r["n"]), *[num(r[k]) for k in ("ece_before", "ece_after", "nll_before",
                                                                    "nll_after")])
    out.print(table)
    out.print(f"COVID called at calibrated probability >= {op['threshold']:.4f} "
              f"(target sensitivity {op['target_sensitivity']:.2f} on val: "
              f"sensitivity {num(op['val_sensitivity'])}, specificity {num(op['val_specificity'])}; "
              f"{op['n_val_covid']} COVID / {op['n_val_other']} other)")
    out.print(f"on test: sensitivity {format_ci(op['test_sensitivity'])}, "
              f"specificity {format_ci(op['test_specificity'])}")
    chosen = DecisionRule.from_dict(result["decision"]["chosen"])
    out.print(f"decision rule stored: {chosen.describe()} ({result['decision']['chosen_by']}: "
              + ", ".join(f"{c['rule']['rule']} {c['worst']:.3f}" for c in result["decision"]["candidates"]
                          if c["worst"] is not None) + ")", markup=False)
    console.print(f"updated {_shown(model / 'config.json')}; wrote {_shown(model / 'eval' / 'calibration.json')} "
                  f"and {_shown(model / 'eval' / 'reliability.png')}", markup=False)
