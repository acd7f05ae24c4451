"""What one open segment costs a reader of the virtual dataset (bench/SCALE.md, train-head at 1M).

    CH=32 [RD=bytes] .venv/bin/python bench/vds_memory.py plain|rdcc

Writes N segment files of R float16 rows (16 KiB each, chunks of CH rows, Fletcher-32, as cache.py
writes them) and a virtual master under /tmp/x15/vds, reads every segment once through the master
and prints the RSS growth per segment; then times 2000 random 32-row reads. `rdcc` opens the
master with a chunk cache of RD bytes (h5py's rdcc_nbytes), which its source files inherit.
"""
import os, sys, h5py, numpy as np, resource
root = "/tmp/x15/vds"; os.makedirs(root, exist_ok=True)
N, R, D = 60, 4096, 8192
if not os.path.exists(root + "/master.h5"):
    layout = h5py.VirtualLayout(shape=(N * R, D), dtype="float16")
    for i in range(N):
        p = f"{root}/s{i}.h5"
        with h5py.File(p, "w") as f:
            f.create_dataset("features", data=np.random.rand(R, D).astype("float16"), chunks=(int(os.environ.get("CH", 64)), D), fletcher32=True)
        layout[i * R:(i + 1) * R] = h5py.VirtualSource(p, "features", shape=(R, D))
    with h5py.File(root + "/master.h5", "w") as f:
        f.create_virtual_dataset("features", layout)
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
mode = sys.argv[1]
if mode == "plain":
    f = h5py.File(root + "/master.h5", "r")
elif mode == "rdcc":
    f = h5py.File(root + "/master.h5", "r", rdcc_nbytes=int(os.environ.get("RD", 0)))
else:
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    cfg = fapl.get_mdc_config()
    cfg.set_initial_size = True; cfg.initial_size = 1 << 16; cfg.min_size = 1 << 14; cfg.max_size = 1 << 20
    fapl.set_mdc_config(cfg)
    if mode == "both":
        fapl.set_cache(0, 0, 0, 0.75)
    f = h5py.File(h5py.h5f.open((root + "/master.h5").encode(), h5py.h5f.ACC_RDONLY, fapl=fapl))
d = f["features"]
r0 = rss()
for i in range(N):
    d[i * R:(i + 1) * R]
print(mode, f"{(rss() - r0) / N:.2f} MB per segment")
import time
rng = np.random.default_rng(0)
starts = rng.permutation(N * R // 32)[:2000] * 32 + int(os.environ.get("OFF", 0))
t = time.perf_counter()
for s in starts:
    d[s:s + 32]
print(mode, f"2000 random 32-row pieces: {time.perf_counter() - t:.2f} s")
