"""Atomic files and tolerant readers (sft.studio.files)."""
import json
import os

import pytest

from sft.studio.files import atomic_write_json, atomic_write_text


def test_atomic_writes_leave_old_content_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "status.json"
    atomic_write_json(path, {"state": "running"})
    assert json.loads(path.read_text()) == {"state": "running"}
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})  # not serialisable: fails before any write
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "half")
    assert json.loads(path.read_text()) == {"state": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temp files left


