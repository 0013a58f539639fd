"""livr_model.atomic: the one atomic writer of the library and the application."""
import os
import threading

import pytest

from livr_model import atomic
from livr_model.app import files


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    atomic.atomic_write_bytes(target, b"old")
    monkeypatch.setattr(atomic.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError, match="killed"):
        atomic.atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["run.json"]


def test_concurrent_writers_never_share_a_temporary_file(tmp_path, monkeypatch):
    """Each write has its own temporary name (a fixed ``name.tmp`` let two writers interleave)."""
    names, barrier = [], threading.Barrier(2)
    real_replace = os.replace

    def replace(src, dst):
        names.append(os.path.basename(src))
        barrier.wait(timeout=10)  # both temporaries exist at once
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    target = tmp_path / "latents.safetensors"
    threads = [threading.Thread(target=atomic.atomic_write_bytes, args=(target, bytes([i]) * 8)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 2 and all(n.endswith(atomic.TMP_SUFFIX) for n in names)
    assert target.read_bytes() in (bytes([0]) * 8, bytes([1]) * 8) and os.listdir(tmp_path) == [target.name]


def test_the_application_writes_through_the_same_writer():
    assert files.atomic_write_bytes is atomic.atomic_write_bytes and files.fsync_dir is atomic.fsync_dir


def test_written_files_get_the_mode_a_plain_write_gives(tmp_path):
    """mkstemp makes its file 0600: renamed into place as it is, a run file in a Trainer checkpoint
    was unreadable to the group and others, unlike every file the Trainer writes beside it."""
    plain = tmp_path / "plain.json"
    plain.write_bytes(b"{}")
    written = atomic.atomic_write_bytes(tmp_path / "run.json", b"{}")
    assert os.stat(written).st_mode & 0o777 == os.stat(plain).st_mode & 0o777
