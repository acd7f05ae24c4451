"""`make bench`, ENGINE=ray against ENGINE=local (bench.py runs it when Ray is installed;
BENCH_RAY=0 skips it). Alone: `BENCH_ONLY="ENGINE=ray against local" make bench`.

Every run is `python -m pipeline extract` in a fresh process on a fresh cache, WEIGHTS=none,
SIZE=150, PRECISION=float32, the photos warm in the page cache:
* ENGINE=local, ENGINE=ray WORKERS=1 and WORKERS=2, each on 8 photos (the fixed cost: start-up,
  and for Ray its cluster, workers and models) and on BENCH_N photos; the steady rate is
  (BENCH_N - 8) / (seconds on BENCH_N - seconds on 8);
* `ray.init(num_cpus=2)` + `ray.shutdown()` alone;
* the peak RSS (VmHWM) of the driver and of every Ray process of the run, found by the RAY_TMPDIR
  it inherits and sampled every 0.2 s.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXED_IMAGES = 8
ENGINES = {"local": ["--engine", "local"],
           "ray_1_worker": ["--engine", "ray", "--workers", "1"],
           "ray_2_workers": ["--engine", "ray", "--workers", "2"]}


def run(picked, work):
    """(figures, details) for bench.py: `picked` are (class, path) of the photos."""
    work = os.path.join(work, "ray")
    shutil.rmtree(work, ignore_errors=True)
    full, few = link(picked, os.path.join(work, "full")), link(
        picked[:FIXED_IMAGES], os.path.join(work, "few"))
    figures, details = {"ray_init_shutdown_s": ray_init_seconds()}, {}
    for engine, args in ENGINES.items():
        small = extract(few, args, work)
        big = extract(full, args, work)
        figures[f"ray_bench_extract_s_{engine}"] = big["seconds"]
        figures[f"ray_bench_fixed_s_{engine}"] = small["seconds"]
        figures[f"ray_bench_steady_ips_{engine}"] = ((len(picked) - FIXED_IMAGES)
                                                     / (big["seconds"] - small["seconds"]))
        figures[f"ray_bench_driver_peak_rss_gb_{engine}"] = big["driver_gb"]
        details[f"ray_bench_processes_peak_rss_gb_{engine}"] = big["processes_gb"]
        print(f"{engine:<14} {len(picked)} photos {big['seconds']:6.1f} s, {FIXED_IMAGES} photos "
              f"{small['seconds']:5.1f} s, driver {big['driver_gb']:.2f} GB, "
              f"processes {big['processes_gb']}", flush=True)
    return figures, details


def link(picked, root):
    for class_name, path in picked:
        os.makedirs(os.path.join(root, class_name), exist_ok=True)
        os.symlink(path, os.path.join(root, class_name, os.path.basename(path)))
        with open(path, "rb") as f:  # warm: every engine reads the same cached bytes
            f.read()
    return root


def extract(data, args, work):
    """Seconds, the driver's peak RSS and every Ray process's peak RSS of one extract."""
    features = os.path.join(work, "features")
    shutil.rmtree(features, ignore_errors=True)
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's socket paths must fit
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": ray_tmp}
    peaks, done = {}, threading.Event()
    sampler = threading.Thread(target=sample, args=(f"RAY_TMPDIR={ray_tmp}", peaks, done))
    sampler.start()
    start = time.perf_counter()
    try:
        with open(os.path.join(work, "extract.log"), "a") as log:
            child = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "extract", "--data", data, "--name", "bench",
                 "--weights", "none", "--size", "150", "--precision", "float32",
                 "--features-root", features, *args], cwd=ROOT, env=env, stdout=log,
                stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
    finally:
        done.set()
        sampler.join()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"extract {' '.join(args)} failed: see {work}/extract.log")
    by_title = {}
    for (pid, title), gb in peaks.items():
        if pid != child.pid:
            by_title.setdefault(title, []).append(round(gb, 2))
    return {"seconds": seconds, "driver_gb": usage.ru_maxrss * 1024 / 1e9,
            "processes_gb": by_title}


def sample(variable, peaks, done):
    """Peak RSS of the processes whose environment holds `variable`, until `done`."""
    while not done.wait(0.2):
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if variable.encode() not in f.read().split(b"\0"):
                        continue
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    title = f.read().split(b"\0")[0].decode(errors="replace")
                with open(f"/proc/{pid}/status") as f:
                    kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
            except (OSError, StopIteration):
                continue
            title = title if title.startswith("ray::") else os.path.basename(title)
            peaks[int(pid), title] = max(peaks.get((int(pid), title), 0), kib * 1024 / 1e9)


def ray_init_seconds():
    code = ("import time, ray; t = time.perf_counter(); ray.init(num_cpus=2, "
            "include_dashboard=False); ray.shutdown(); print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])

