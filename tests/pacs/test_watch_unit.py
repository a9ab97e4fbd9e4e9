"""The watcher's bookkeeping and the client's credentials, without a PACS: a restart neither repeats nor skips
a study, patient data never reaches a log line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxrscreen.errors import CXRError
from cxrscreen.pacs.client import Credentials, credentials_from_env, make_session, study_tag
from cxrscreen.pacs.watch import WatchState, watch


class FakeFeed:
    """Orthanc's /changes as a list of (seq, study UID or None for another kind of change)."""

    url = "http://orthanc.invalid"

    def __init__(self, changes: list[tuple[int, str | None]]) -> None:
        self.changes = changes

    def last(self) -> int:
        return self.changes[-1][0] if self.changes else 0

    def stable_studies(self, since: int, limit: int = 2) -> tuple[list[tuple[int, str]], int, bool]:
        page = [c for c in self.changes if c[0] > since][:limit]
        last = page[-1][0] if page else since
        return [(s, u) for s, u in page if u], last, len([c for c in self.changes if c[0] > since]) <= limit


def _run(feed: FakeFeed, state: WatchState, seen: list[str], polls: int, fail_on: str | None = None) -> None:
    def handle(uid: str) -> None:
        if uid == fail_on:
            raise KeyboardInterrupt  # killed while screening this study
        seen.append(uid)

    gen = watch(feed, state, handle, sleep=lambda s: None)
    for _ in range(polls):
        next(gen)


def test_restart_neither_repeats_nor_skips(tmp_path: Path) -> None:
    state = WatchState(tmp_path / "state.json")
    feed = FakeFeed([(1, "old")])
    seen: list[str] = []
    _run(feed, state, seen, 1)
    assert seen == [] and json.loads(state.path.read_text())["last_change"] == 1  # starts at the newest change
    feed.changes += [(2, "a"), (3, None), (4, "b"), (5, "c"), (6, "d")]
    with pytest.raises(KeyboardInterrupt):
        _run(feed, state, seen, 5, fail_on="c")
    assert seen == ["a", "b"] and json.loads(state.path.read_text())["last_change"] == 4
    _run(feed, state, seen, 3)  # restarted
    assert seen == ["a", "b", "c", "d"]


def test_unreadable_state_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "s.json").write_text("{not json")
    with pytest.raises(CXRError, match="unreadable watch state file"):
        WatchState(tmp_path / "s.json").load()


def test_credentials_come_from_the_environment_and_tls_is_verified() -> None:
    creds = credentials_from_env({"CXRSCREEN_PACS_USER": "u", "CXRSCREEN_PACS_PASSWORD": "p"})
    session = make_session(creds)
    assert session.auth == ("u", "p") and session.verify is True
    token = make_session(credentials_from_env({"CXRSCREEN_PACS_TOKEN": "t0k"}))
    assert token.headers["Authorization"] == "Bearer t0k" and token.auth is None
    with pytest.raises(CXRError, match="CXRSCREEN_PACS_PASSWORD"):
        credentials_from_env({"CXRSCREEN_PACS_USER": "u"})
    assert make_session(Credentials(), verify="/ca.pem").verify == "/ca.pem"


def test_study_tag_hides_the_uid() -> None:
    uid = "1.2.840.113619.2.55.3.604688119.969.1234567890.123"
    tag = study_tag(uid)
    assert tag.startswith("study-") and len(tag) == 18 and uid not in tag and tag == study_tag(uid)


def test_an_unreadable_feed_is_reported_and_polled_again(tmp_path: Path) -> None:
    feed = FakeFeed([(1, None)])
    state = WatchState(tmp_path / "state.json")
    real = feed.stable_studies
    calls = {"n": 0}

    def flaky(since: int, limit: int = 2) -> tuple[list[tuple[int, str]], int, bool]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise CXRError("Orthanc REST /changes failed (ConnectionError)", feed.url)
        return real(since, limit)

    feed.stable_studies = flaky  # type: ignore[method-assign]
    feed.changes.append((2, "a"))
    state.save(1, feed.url)
    seen: list[str] = []
    errors: list[CXRError] = []
    gen = watch(feed, state, seen.append, sleep=lambda s: None, on_error=errors.append)
    next(gen)
    next(gen)
    assert len(errors) == 1 and seen == ["a"]
    with pytest.raises(CXRError):  # without on_error the problem is raised
        feed.stable_studies = lambda since, limit=2: (_ for _ in ()).throw(CXRError("down"))  # type: ignore[method-assign]
        next(watch(feed, state, seen.append, sleep=lambda s: None))
