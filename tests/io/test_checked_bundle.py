"""read_checked_bundle: a model folder's config and weights, the weights checked against the config's sha256."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxrscreen.errors import CXRError
from cxrscreen.io.files import file_sha256, read_checked_bundle


def _bundle(folder: Path, config: dict | str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "w.bin").write_bytes(b"weights")
    (folder / "c.json").write_text(config if isinstance(config, str) else json.dumps(config))


def test_good_bundle_is_read(tmp_path: Path) -> None:
    _bundle(tmp_path, {})
    (tmp_path / "c.json").write_text(json.dumps({"weights_sha256": file_sha256(tmp_path / "w.bin"), "a": 1}))
    config, weights = read_checked_bundle(tmp_path, "c.json", "w.bin", "test model")
    assert config["a"] == 1 and weights == tmp_path / "w.bin"


@pytest.mark.parametrize(("config", "require", "message"), [
    (None, True, "no test model"),
    ("{broken", True, "not valid JSON"),
    ({}, True, "records no weights_sha256"),
    ({"weights_sha256": "0" * 64}, False, "test model: weights checksum mismatch"),
])
def test_bad_bundles_name_the_problem(tmp_path: Path, config: dict | str | None, require: bool, message: str) -> None:
    if config is not None:
        _bundle(tmp_path, config)
    with pytest.raises(CXRError, match=message):
        read_checked_bundle(tmp_path, "c.json", "w.bin", "test model", require_checksum=require)


def test_checksum_may_be_optional(tmp_path: Path) -> None:
    _bundle(tmp_path, {})
    assert read_checked_bundle(tmp_path, "c.json", "w.bin", "test model", require_checksum=False)[0] == {}
