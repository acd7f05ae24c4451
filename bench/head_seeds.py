"""The dense head through the pipeline (extract, then train_head.run with HEAD=dense) on the bench's
cats_vs_dogs cache with AUGMENT=K views, once per seed (bench/QUALITY_NOTES.md, section f).

    .venv/bin/python bench/head_seeds.py K EPOCHS SEED[,SEED...]

The views must be in the cache already or are computed first (~15 min per 5 views on 2 cores).
Models go to bench/acc/models_seeds/k<K>_e<EPOCHS>_s<SEED>/; one JSON line per seed.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from pipeline import runtime  # noqa: E402

runtime.start("tensorflow", False)  # before Keras is imported
import accuracy  # noqa: E402  (bench/accuracy.py: the accuracy phases' Config and folders)

from pipeline import extract, registry, train_head  # noqa: E402

DATA = os.environ.get("BENCH_DATA") or os.path.join(ROOT, "..", "shared", "data", "cats_vs_dogs")
WORK = os.path.join(ROOT, "bench", "work")  # as bench.py: where BENCH_ACCURACY_N's subset goes


def main(k, epochs, seeds):
    config, root = accuracy.config_for(DATA, WORK, 150, 32)
    config = config.replace(augment=k, head="dense", epochs=epochs)
    extract.run(config)  # the cache lists the views of its last extract's AUGMENT
    for seed in seeds:
        run = config.replace(seed=seed, models_root=os.path.join(
            root, "models_seeds", f"k{k}_e{epochs}_s{seed}"))
        train_head.run(run)
        record = registry.record(run, "dense")
        print(json.dumps({"augment": k, "epochs": epochs, "seed": seed,
                          "validation": round(record.validation["accuracy"], 4),
                          "test": round(record.test["accuracy"], 4),
                          "best_epoch": record.entry["best_epoch"]}), flush=True)
    extract.run(config.replace(augment=0))  # the bench's cache as the accuracy phase leaves it


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), [int(s) for s in sys.argv[3].split(",")])
