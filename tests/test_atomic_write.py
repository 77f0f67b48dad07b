"""Every checkpoint, table and results file is written whole or not at all."""

import errno
import json
import os
import stat

import pytest

from instanas.utils import atomic_copy, write_json


def test_a_failed_write_leaves_the_old_file_whole_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json(path, {"accuracy": 0.9})

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        write_json(path, {"accuracy": 0.1})
    assert json.loads(path.read_text()) == {"accuracy": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_written_files_follow_the_umask_not_mkstemp(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    write_json(tmp_path / "a.json", {})
    atomic_copy(tmp_path / "a.json", tmp_path / "b.json")
    for name in ("a.json", "b.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask
