"""What one open segment costs a reader of the virtual dataset (bench/SCALE.md, train-head at 1M).

    [CHUNK_ROWS=32] .venv/bin/python bench/vds_memory.py [RDCC_BYTES]

Writes 60 segment files of 4,096 float16 rows (16 KiB each, in chunks of CHUNK_ROWS rows with
Fletcher-32, as cache.py writes them at SIZE=150) and a virtual master over them, under
/tmp/vds_memory (kept for the next run). It reads every segment once through the master and
prints the RSS growth per segment, then times 2,000 random 32-row reads. RDCC_BYTES opens the
master with that chunk cache (h5py's rdcc_nbytes), which its source files inherit; without it,
HDF5's default (1 MiB).
"""
import os
import sys
import time

import h5py
import numpy as np

ROOT = "/tmp/vds_memory"
SEGMENTS, ROWS, WIDTH = 60, 4096, 8192
CHUNK_ROWS = int(os.environ.get("CHUNK_ROWS") or 32)


def make():
    os.makedirs(ROOT, exist_ok=True)
    layout = h5py.VirtualLayout(shape=(SEGMENTS * ROWS, WIDTH), dtype="float16")
    rng = np.random.default_rng(0)
    for i in range(SEGMENTS):
        path = os.path.join(ROOT, f"segment{i}.h5")
        with h5py.File(path, "w") as f:
            f.create_dataset("features", data=rng.random((ROWS, WIDTH), np.float32)
                             .astype(np.float16), chunks=(CHUNK_ROWS, WIDTH), fletcher32=True)
        layout[i * ROWS:(i + 1) * ROWS] = h5py.VirtualSource(path, "features",
                                                             shape=(ROWS, WIDTH))
    with h5py.File(os.path.join(ROOT, "master.h5"), "w") as f:
        f.create_virtual_dataset("features", layout)


def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


if __name__ == "__main__":
    if not os.path.exists(os.path.join(ROOT, "master.h5")):
        make()
    cache = {"rdcc_nbytes": int(sys.argv[1])} if len(sys.argv) > 1 else {}
    with h5py.File(os.path.join(ROOT, "master.h5"), "r", **cache) as f:
        features = f["features"]
        before = rss_mb()
        for i in range(SEGMENTS):
            features[i * ROWS:(i + 1) * ROWS]
        per_segment = (rss_mb() - before) / SEGMENTS
        starts = np.random.default_rng(0).permutation(SEGMENTS * ROWS // 32)[:2000] * 32
        start = time.perf_counter()
        for row in starts:
            features[row:row + 32]
        seconds = time.perf_counter() - start
    print(f"chunk cache {cache.get('rdcc_nbytes', 'default')}: {per_segment:.2f} MB per open "
          f"segment; 2000 random 32-row reads in {seconds:.2f} s")
