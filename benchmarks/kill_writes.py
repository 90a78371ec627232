"""Nothing lost: SIGKILL a process that keeps saving a model, check the file is never partial.

Run:  PYTHONPATH=$PWD python benchmarks/kill_writes.py [--kills 100] [--floats 2000000]

A forked child saves (``mlpersonal.save``) two versions of a large-ish spec (an innerProduct of
``--floats`` weights, ~8 MB) alternately to one destination, forever; the parent SIGKILLs it after
a random delay spanning a few save durations, then parses the destination and compares it with
both versions. Each kill must leave exactly version A or version B. Kills that land inside a
write leave a ``.<name>.*.tmp`` file; the table counts them and shows that the next save and
load are unaffected and that stale temp files are removed by a later save.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path


def two_versions(n_floats: int = 2_000_000):
    """(spec A, spec B): the same innerProduct model with different weights and versionString."""
    import numpy as np
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    cin = 1000
    cout = max(1, n_floats // cin)
    specs = []
    for k, tag in enumerate("AB"):
        b = NeuralNetworkBuilder([("x", datatypes.Array(cin))], [("y", datatypes.Array(cout))])
        w = np.full((cout, cin), k + 1.0, dtype=np.float32)
        w[0, :] = np.arange(cin, dtype=np.float32) * (k + 1)
        b.add_inner_product("fc", w, None, cin, cout, False, "x", "y")
        b.spec.description.metadata.versionString = tag
        specs.append(b.spec)
    return specs[0], specs[1]


def _writer(specs, dest: Path, naive: bool = False) -> None:
    import mlpersonal as mp

    i = 1  # the destination starts as version A; the first write is B
    while True:
        if naive:  # the control: a plain overwrite, as a non-atomic save would do
            with open(dest, "wb") as f:
                f.write(specs[i % 2].SerializeToString())
        else:
            mp.save(specs[i % 2], dest)
        i += 1


def temps(dest: Path) -> list[Path]:
    return sorted(dest.parent.glob(f".{dest.name}.*.tmp"))


def run(kills: int = 100, n_floats: int = 2_000_000, seed: int = 0, folder=None,
        naive: bool = False) -> dict:
    """Kill a saving child ``kills`` times; return counts (``corrupt`` must be 0).

    ``naive=True`` kills a plain ``open(dest, "wb").write`` writer instead: the control showing
    that the check does see partial files.
    """
    import mlpersonal as mp

    a, b = two_versions(n_floats)
    blobs = {a.SerializeToString(): "A", b.SerializeToString(): "B"}
    own = folder is None
    folder = Path(tempfile.mkdtemp(prefix="killwrites.")) if own else Path(folder)
    dest = folder / "model.mlmodel"
    t0 = time.perf_counter()
    for _ in range(3):
        mp.save(a, dest)
    t_save = (time.perf_counter() - t0) / 3
    rng = random.Random(seed)
    counts = {"kills": kills, "A": 0, "B": 0, "corrupt": 0, "mid_write": 0}
    corrupt_details = []
    for k in range(kills):
        pid = os.fork()
        if pid == 0:  # child: save forever until killed
            try:
                _writer((a, b), dest, naive)
            finally:
                os._exit(0)
        before = set(temps(dest))
        time.sleep(rng.uniform(0.0, 3.0 * t_save))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        data = dest.read_bytes()
        version = blobs.get(data)
        if version is None:
            counts["corrupt"] += 1
            try:
                what = f"parses as versionString {mp.load_spec(data).description.metadata.versionString!r}"
            except mp.MLPersonalError as e:
                what = str(e)[:120]
            corrupt_details.append((k, len(data), what))
        else:
            counts[version] += 1
            assert mp.load_spec(dest).description.metadata.versionString == version
        if set(temps(dest)) - before:
            counts["mid_write"] += 1
    left = temps(dest)
    counts["temp_files_left"] = len(left)
    # leftovers are harmless: the next save and load work; once stale, a save removes them
    mp.save(b, dest)
    counts["load_after"] = mp.load_spec(dest).description.metadata.versionString
    old = time.time() - 2 * 3600
    for p in left:
        os.utime(p, (old, old))
    mp.save(a, dest)
    counts["temp_files_after_cleanup"] = len(temps(dest))
    counts["save_seconds"] = round(t_save, 4)
    counts["file_bytes"] = len(a.SerializeToString())
    counts["corrupt_details"] = corrupt_details
    if own:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--floats", type=int, default=2_000_000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    c = run(a.kills, a.floats, a.seed)
    n = run(a.kills, a.floats, a.seed, naive=True)
    print(f"kill_writes: {c['kills']} SIGKILLs per writer of a process saving a {c['file_bytes']} "
          f"byte model (one mp.save {c['save_seconds'] * 1000:.1f} ms), "
          f"{time.perf_counter() - t0:.1f} s")
    rows = [("kills", "kills"), ("destination = version A", "A"),
            ("destination = version B", "B"), ("corrupt or partial files", "corrupt"),
            ("kills inside a write (temp left)", "mid_write"),
            ("temp files left", "temp_files_left"),
            ("next save + load works", "load_after"),
            ("temp files after stale cleanup", "temp_files_after_cleanup")]
    print(f"  {'':<36} {'mp.save':>10} {'naive open+write':>18}")
    for k, key in rows:
        cv, nv = c[key], n[key]
        if key == "load_after":
            cv, nv = cv == "B", nv == "B"
        print(f"  {k:<36} {cv!s:>10} {nv!s:>18}")
    for d in c["corrupt_details"]:
        print("  CORRUPT", d)
    return 0 if c["corrupt"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
