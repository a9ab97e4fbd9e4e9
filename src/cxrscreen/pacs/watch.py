"""Unattended screening of an Orthanc PACS: follow its /changes feed for StableStudy events.

The position in the feed (Orthanc's change sequence number) is saved in a state file (atomically) after
every study, so a restarted watcher neither repeats nor skips studies. Without a state file it starts at the
newest change (studies already stored are left to `cxrscreen pacs run`). Studies cxrscreen itself writes
into (its SR and SC make the study change again) come back as a StableStudy and are found already done.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cxrscreen.errors import CXRError
from cxrscreen.io.files import write_json


class OrthancChanges:
    """Orthanc's REST /changes feed through a requests Session (the PACS client's credentials and TLS)."""

    def __init__(self, rest_url: str, session: Any, *, timeout: float = 60.0) -> None:
        self.url = rest_url.rstrip("/")
        self.session = session
        self.timeout = timeout

    def _get(self, path: str, **params: Any) -> Any:
        import requests

        try:
            r = self.session.get(f"{self.url}{path}", params=params, timeout=self.timeout)
            r.raise_for_status()
            return r.json()
        except requests.RequestException as exc:
            raise CXRError(f"Orthanc REST {path} failed ({type(exc).__name__})", self.url) from exc

    def last(self) -> int:
        """The sequence number of the newest change."""
        return int(self._get("/changes", last="")["Last"])

    def stable_studies(self, since: int, limit: int = 100) -> tuple[list[tuple[int, str]], int, bool]:
        """([(sequence number, Study Instance UID) of StableStudy changes after `since`], the last sequence
        number read, whether the feed is exhausted)."""
        page = self._get("/changes", since=since, limit=limit)
        out = []
        for change in page.get("Changes", []):
            if change.get("ChangeType") == "StableStudy":
                try:
                    study = self._get(f"/studies/{change['ID']}")
                except CXRError:
                    continue  # deleted since: nothing to screen
                uid = (study.get("MainDicomTags") or {}).get("StudyInstanceUID")
                if uid:
                    out.append((int(change["Seq"]), str(uid)))
        return out, int(page.get("Last", since)), bool(page.get("Done", True))


class WatchState:
    """The state file: {"orthanc": URL, "last_change": N}."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self) -> int | None:
        if not self.path.exists():
            return None
        try:
            return int(json.loads(self.path.read_text(encoding="utf-8"))["last_change"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CXRError(f"unreadable watch state file ({exc})", self.path) from exc

    def save(self, seq: int, url: str) -> None:
        write_json(self.path, {"orthanc": url, "last_change": seq})


def watch(changes: OrthancChanges, state: WatchState, handle: Callable[[str], None], *,
          interval_s: float = 5.0, max_seconds: float | None = None,
          sleep: Callable[[float], None] = time.sleep,
          on_error: Callable[[CXRError], None] | None = None) -> Iterator[int]:
    """Follow the feed, calling `handle(study_uid)` for each stable study and saving the position after each;
    yields the position after every poll. Runs until `max_seconds` have passed (None: forever). A feed that
    cannot be read (Orthanc restarting, the network down) is reported to `on_error` and polled again after
    `interval_s`; without `on_error` the CXRError is raised."""
    seq = state.load()
    if seq is None:
        seq = changes.last()
        state.save(seq, changes.url)
    t0 = time.monotonic()
    while max_seconds is None or time.monotonic() - t0 < max_seconds:
        try:
            studies, last, done = changes.stable_studies(seq)
        except CXRError as exc:
            if on_error is None:
                raise
            on_error(exc)
            yield seq
            sleep(interval_s)
            continue
        for change_seq, uid in studies:
            handle(uid)
            state.save(change_seq, changes.url)
        seq = max(seq, last)
        state.save(seq, changes.url)
        yield seq
        if done:
            sleep(interval_s)
