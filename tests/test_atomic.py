"""Nothing lost: saves are atomic under SIGKILL, and failed saves leave the original intact."""

import errno
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from coremltools.models import datatypes
from coremltools.models.neural_network import NeuralNetworkBuilder

import mlpersonal as mp
from benchmarks import kill_writes
from mlpersonal import fileio
from mlpersonal.fileio import ModelWriteError


def test_sigkill_during_saves_never_leaves_a_partial_file(tmp_path):
    c = kill_writes.run(kills=20, n_floats=500_000, seed=1, folder=tmp_path)
    assert c["corrupt"] == 0, c["corrupt_details"]
    assert c["A"] + c["B"] == 20
    assert c["mid_write"] >= 1  # some kills did land inside a write
    assert c["load_after"] == "B" and c["temp_files_after_cleanup"] == 0


def test_control_naive_writes_are_caught(tmp_path):
    """The same check sees partial files when the writer is a plain open(..., 'wb').write."""
    c = kill_writes.run(kills=10, n_floats=500_000, seed=2, folder=tmp_path, naive=True)
    assert c["corrupt"] >= 1


def _spec(value=1.0):
    b = NeuralNetworkBuilder([("x", datatypes.Array(4))], [("y", datatypes.Array(2))])
    b.add_inner_product("fc", np.full((2, 4), value, np.float32), None, 4, 2, False, "x", "y")
    return b.spec


def test_save_into_a_file_path_parent_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_bytes(b"x")
    with pytest.raises(ModelWriteError, match="cannot write .*not_a_dir/m.mlmodel: .*check that "
                       ".*not_a_dir is a writable folder"):
        mp.save(_spec(), blocker / "m.mlmodel")
    assert blocker.read_bytes() == b"x"


def _as_unprivileged(fn) -> int:
    """Run ``fn`` in a forked child (as user nobody when we are root); its exit status."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            code = fn()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_save_into_read_only_dir():
    top = Path(tempfile.mkdtemp(prefix="mp-ro."))  # reachable by an unprivileged user
    top.chmod(0o755)
    ro, rw = top / "ro", top / "rw"
    ro.mkdir()
    rw.mkdir()
    mp.save(_spec(1.0), ro / "m.mlmodel")
    before = (ro / "m.mlmodel").read_bytes()
    ro.chmod(0o555)
    rw.chmod(0o777)

    def attempt(folder):
        try:
            mp.save(_spec(2.0), folder / "m.mlmodel")
        except ModelWriteError as e:
            return 1 if "Permission denied" in str(e) and "writable folder" in str(e) else 2
        return 0

    try:
        assert _as_unprivileged(lambda: attempt(rw)) == 0  # control: the same user can save
        assert _as_unprivileged(lambda: attempt(ro)) == 1
        assert (ro / "m.mlmodel").read_bytes() == before
        assert [p.name for p in ro.iterdir()] == ["m.mlmodel"]
    finally:
        ro.chmod(0o700)
        shutil.rmtree(top)


def test_failed_write_leaves_original_and_no_temp(tmp_path, monkeypatch):
    """Disk full during the write (simulated at fsync): the original file is untouched."""
    dest = tmp_path / "m.mlmodel"
    mp.save(_spec(1.0), dest)
    before = dest.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full)
    with pytest.raises(ModelWriteError, match="No space left on device.*previous file, if any, "
                       "is unchanged") as ei:
        mp.save(_spec(2.0), dest)
    assert isinstance(ei.value, OSError)  # callers catching OSError still do
    monkeypatch.undo()
    assert dest.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mlmodel"]


def test_destination_is_a_directory(tmp_path):
    (tmp_path / "m.mlmodel").mkdir()
    with pytest.raises(ModelWriteError, match="previous file, if any, is unchanged"):
        mp.save(_spec(), tmp_path / "m.mlmodel")
    assert (tmp_path / "m.mlmodel").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mlmodel"]


def test_compiled_model_save_is_atomic_and_reloads(tmp_path):
    m = mp.load(_spec(3.0))
    m.save(tmp_path / "m.mlmodel")
    x = {"x": np.arange(4, dtype=np.float32)}
    np.testing.assert_allclose(mp.load(tmp_path / "m.mlmodel").predict(x)["y"], m.predict(x)["y"])
    assert [p.name for p in tmp_path.iterdir()] == ["m.mlmodel"]


def test_stale_temp_files_are_removed_young_ones_kept(tmp_path):
    dest = tmp_path / "m.mlmodel"
    stale = tmp_path / ".m.mlmodel.abc123.tmp"
    young = tmp_path / ".m.mlmodel.def456.tmp"  # may belong to a concurrent writer
    other = tmp_path / ".other.mlmodel.abc123.tmp"
    for p in (stale, young, other):
        p.write_bytes(b"partial")
    old = time.time() - 2 * fileio.STALE_TEMP_SECONDS
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    mp.save(_spec(), dest)
    assert not stale.exists()
    assert young.exists() and other.exists()
    assert mp.load_spec(dest) == _spec()
