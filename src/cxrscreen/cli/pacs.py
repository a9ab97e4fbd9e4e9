"""`cxrscreen pacs run` and `cxrscreen pacs watch`: screen a DICOMweb PACS's chest X-rays and store the
results (SR + heatmap Secondary Capture) back into each study. Credentials come from the environment
(CXRSCREEN_PACS_USER / CXRSCREEN_PACS_PASSWORD, or CXRSCREEN_PACS_TOKEN), never from the command line;
TLS certificates are verified unless --insecure is given. Study UIDs and patient data never appear in the
output: studies are named by a hash of their UID."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from cxrscreen.cli.app import _fail, app, console
from cxrscreen.errors import CXRError

pacs_app = typer.Typer(help="Screen a PACS over DICOMweb and store SR + heatmap Secondary Capture in each study.",
                       no_args_is_help=True, rich_markup_mode=None)
app.add_typer(pacs_app, name="pacs")

UrlOpt = Annotated[str, typer.Option("--url", help="DICOMweb service root, e.g. https://pacs/dicom-web")]
ModelOpt = Annotated[Path | None, typer.Option(help="run directory (default: the bundled model)")]
InsecureOpt = Annotated[bool, typer.Option("--insecure", help="do not verify the PACS's TLS certificate")]
CaOpt = Annotated[Path | None, typer.Option("--ca-bundle", help="CA bundle to verify the PACS's certificate")]
ThreadsOpt = Annotated[int | None, typer.Option(help="torch threads (default: one per core; 1 is faster on a "
                                                   "machine busy with other work: images go one at a time)")]
UserOpt = Annotated[str | None, typer.Option("--user", help="user name (default: $CXRSCREEN_PACS_USER); the "
                                                            "password is read from $CXRSCREEN_PACS_PASSWORD")]


def _screener(url: str, model: Path | None, insecure: bool, ca_bundle: Path | None, user: str | None,
              argmax: bool, threshold: float | None, threads: int | None) -> Any:
    from cxrscreen.cli.predict import _load_gate
    from cxrscreen.pacs.client import Credentials, PacsClient, credentials_from_env
    from cxrscreen.pacs.run import StudyScreener
    from cxrscreen.predict.onnx_engine import load_for_engine

    if threads is not None:
        import torch

        torch.set_num_threads(max(1, threads))
    try:
        creds = credentials_from_env()
        if user is not None:
            creds = Credentials(user=user, password=creds.password, token=creds.token)
        if insecure:
            console.print("warning: --insecure: the PACS's TLS certificate is not verified", markup=False)
        verify: bool | str = False if insecure else (str(ca_bundle) if ca_bundle is not None else True)
        client = PacsClient(url, creds=creds, verify=verify)
        run = load_for_engine(model, "torch")
        rule = run.decision_rule(argmax=argmax, threshold=threshold)
        return StudyScreener(run, client, gate=_load_gate(run), rule=rule)
    except CXRError as exc:
        _fail(exc)


def _report(outcome: Any) -> None:
    print(json.dumps(outcome.to_dict()), flush=True)
    for err in outcome.errors:
        console.print(f"{outcome.study}: error: {err}", markup=False)


@pacs_app.command("run")
def pacs_run(
    url: UrlOpt,
    study: Annotated[list[str] | None, typer.Option("--study", help="Study Instance UID (repeatable)")] = None,
    since: Annotated[str | None, typer.Option(help="studies with a StudyDate on or after YYYY-MM-DD")] = None,
    model: ModelOpt = None,
    argmax: Annotated[bool, typer.Option("--argmax", help="the most probable class, not the operating point")
                      ] = False,
    threshold: Annotated[float | None, typer.Option(help="call COVID at p(covid) >= this instead")] = None,
    user: UserOpt = None,
    insecure: InsecureOpt = False,
    ca_bundle: CaOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Query the studies, screen their frontal DX/CR images, store an SR and a heatmap Secondary Capture in
    each study (nothing for instances already done). One JSON line per study on stdout.
    Exit status: 0 all done, 1 some study failed, 2 bad usage."""
    if bool(study) == (since is not None):
        console.print("error: give --study UID (repeatable) or --since YYYY-MM-DD", markup=False)
        raise typer.Exit(2)
    day = None
    if since is not None:
        try:
            day = datetime.date.fromisoformat(since)
        except ValueError:
            console.print(f"error: --since takes a date YYYY-MM-DD, not {since!r}", markup=False)
            raise typer.Exit(2) from None
    screener = _screener(url, model, insecure, ca_bundle, user, argmax, threshold, threads)
    from cxrscreen.pacs.run import screen_studies

    try:
        studies = list(study) if study else screener.client.studies(since=day)
    except CXRError as exc:
        _fail(exc)
    outcomes = screen_studies(screener, studies, _report)
    bad = sum(not o.ok for o in outcomes)
    console.print(f"{len(outcomes)} studies: {sum(o.screened for o in outcomes)} images screened, "
                  f"{sum(o.stored for o in outcomes)} objects stored, {bad} studies failed", markup=False)
    if bad:
        raise typer.Exit(1)


@pacs_app.command("watch")
def pacs_watch(
    url: UrlOpt,
    state: Annotated[Path, typer.Option(help="state file: where in Orthanc's change feed to go on")],
    orthanc: Annotated[str | None, typer.Option(help="Orthanc REST root (default: --url without /dicom-web)")
                       ] = None,
    interval: Annotated[float, typer.Option(help="seconds between polls when nothing is new")] = 5.0,
    max_seconds: Annotated[float | None, typer.Option(help="stop after this many seconds (default: never)")
                           ] = None,
    model: ModelOpt = None,
    argmax: Annotated[bool, typer.Option("--argmax")] = False,
    threshold: Annotated[float | None, typer.Option()] = None,
    user: UserOpt = None,
    insecure: InsecureOpt = False,
    ca_bundle: CaOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Screen every study Orthanc marks stable from now on (the model stays loaded); the position in the change
    feed is kept in --state so that a restart neither repeats nor skips studies."""
    from cxrscreen.pacs.watch import OrthancChanges, WatchState, watch

    screener = _screener(url, model, insecure, ca_bundle, user, argmax, threshold, threads)
    rest = orthanc or url.rstrip("/").removesuffix("/dicom-web")
    changes = OrthancChanges(rest, screener.client.session)
    console.print(f"watching {rest} for stable studies (state: {state})", markup=False)
    try:
        for _ in watch(changes, WatchState(state), lambda uid: _report(screener.screen(uid)), interval_s=interval,
                       max_seconds=max_seconds,
                       on_error=lambda exc: console.print(f"warning: {exc}; polling again", markup=False)):
            pass
    except CXRError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        console.print("stopped", markup=False)
