"""Time and peak memory of `make audit` on a synthetic cache (bench/support.py) of ROWS rows.

    .venv/bin/python bench/audit_scale.py FOLDER [ROWS=100000] [SIZE=150]

Writes FOLDER/features/synthetic (3.3 GB at 100k rows, SIZE=150: delete it after), runs the
audit in a child process and prints its wall time, peak RSS and audit.json's stage timings.
"""
import json
import os
import sys
import time

from support import peak_rss_gb, write_synthetic_cache


def main(folder, rows=100_000, size=150):
    folder = os.path.abspath(folder)
    if not os.path.exists(os.path.join(folder, "features", "synthetic", "features.h5")):
        start = time.perf_counter()
        write_synthetic_cache(folder, rows, size)
        print(f"wrote a {rows}-row cache in {time.perf_counter() - start:.0f} s", flush=True)
    args = ["audit", "--data", folder, "--name", "synthetic", "--size", str(size),
            "--features-root", os.path.join(folder, "features"),
            "--models-root", os.path.join(folder, "models")]
    start = time.perf_counter()
    peak = peak_rss_gb(args, os.path.join(folder, "audit.log"), os.path.dirname(
        os.path.dirname(os.path.abspath(__file__))))
    wall = time.perf_counter() - start
    with open(os.path.join(folder, "models", "synthetic", "audit", "audit.json")) as f:
        summary = json.load(f)
    print(json.dumps({"rows": rows, "size": size, "wall_s": round(wall, 1),
                      "peak_rss_gb": round(peak, 2), "seconds": summary["seconds"],
                      "pairs": summary["near_duplicates"]["pairs"],
                      "label_issues": summary["label_issues"]["candidates"],
                      "outliers": summary["outliers"]["rows"]}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
