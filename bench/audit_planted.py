"""A small cats-vs-dogs set with known faults planted, to measure what `make audit` finds.

    .venv/bin/python bench/audit_planted.py build OUT       # OUT/{train,validation,test}/<class>/*
    .venv/bin/python bench/audit_planted.py score MODELS_ROOT NAME  # after extract + audit
    .venv/bin/python bench/audit_planted.py novel NEW               # images for make predict
    .venv/bin/python bench/audit_planted.py flagged PREDICTIONS_CSV  # after make predict IMAGES=NEW

`build` copies 40 + 40 train, 20 + 20 validation and 20 + 20 test photos of
../shared/data/cats_vs_dogs/train (read only), then plants:
  - 10 near-copies: train photos resized to 80% and re-encoded as JPEG quality 60, in test
    (named copy_of_<original>), the leakage a random split of scraped photos brings;
  - 5 label errors: train photos stored under the other class (named swapped_<original>).
`score` reads models/NAME/audit/*.csv and prints, for several similarity thresholds, how many of
the planted copies are found and how many other pairs come with them, and the rank of each planted
label error in label_issues.csv.
`novel` writes NEW/photos/: 10 + 10 cats_vs_dogs photos that are in no split, and NEW/drawings/:
6 striped drawings (pipeline.data.demo), unlike anything trained on; `flagged` counts how many of
each predict marked unlike_training.
"""
import csv
import os
import shutil
import sys

from PIL import Image

SOURCE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cats_vs_dogs",
                      "train")
COUNTS = {"train": 40, "validation": 20, "test": 20}  # per class
COPIES, SWAPS = 10, 5
THRESHOLDS = (0.99, 0.98, 0.97, 0.95, 0.93, 0.90, 0.85, 0.80, 0.75)


def build(out):
    classes = sorted(os.listdir(SOURCE))
    taken = {c: sorted(os.listdir(os.path.join(SOURCE, c)), key=_number) for c in classes}
    for split in COUNTS:
        for c in classes:
            os.makedirs(os.path.join(out, split, c), exist_ok=True)
    for c in classes:
        names, first = taken[c], 0
        for split, n in COUNTS.items():
            for name in names[first:first + n]:
                shutil.copy(os.path.join(SOURCE, c, name), os.path.join(out, split, c, name))
            first += n
    # copies: train photos of both classes, resized and re-encoded, into the test split
    for i in range(COPIES):
        c = classes[i % 2]
        name = taken[c][i // 2]
        image = Image.open(os.path.join(SOURCE, c, name)).convert("RGB")
        image = image.resize((int(image.width * 0.8), int(image.height * 0.8)), Image.BICUBIC)
        image.save(os.path.join(out, "test", c, f"copy_of_{name}"), quality=60)
    # label errors: train photos moved under the other class
    for i in range(SWAPS):
        c, other = classes[i % 2], classes[1 - i % 2]
        name = taken[c][COUNTS["train"] - 1 - i // 2]
        os.replace(os.path.join(out, "train", c, name),
                   os.path.join(out, "train", other, f"swapped_{name}"))
    total = sum(len(files) for _, _, files in os.walk(out))
    print(f"built {out}: {total} images, {COPIES} planted copies, {SWAPS} swapped labels")


def score(name, models_root="models"):
    folder = os.path.join(models_root, name, "audit")
    with open(os.path.join(folder, "near_duplicates.csv"), newline="") as f:
        pairs = list(csv.DictReader(f))
    planted = {}
    for p in pairs:
        a, b = os.path.basename(p["path_a"]), os.path.basename(p["path_b"])
        for x, y in ((a, b), (b, a)):
            if x.startswith("copy_of_") and x[len("copy_of_"):] == y:
                planted[x] = max(planted.get(x, 0.0), float(p["similarity"]))
    sims = [float(p["similarity"]) for p in pairs]
    print(f"{len(pairs)} pairs listed (lowest similarity {min(sims, default=float('nan')):.4f}); "
          f"planted copies' similarities: {sorted(round(s, 4) for s in planted.values())}")
    print("threshold  planted found  other pairs")
    for t in THRESHOLDS:
        found = sum(s >= t for s in planted.values())
        others = sum(1 for p in pairs if float(p["similarity"]) >= t) - found
        print(f"{t:9.2f}  {found:>6d} / {COPIES}  {others:>11d}")
    with open(os.path.join(folder, "label_issues.csv"), newline="") as f:
        issues = list(csv.DictReader(f))
    ranks = [i + 1 for i, row in enumerate(issues)
             if os.path.basename(row["path"]).startswith("swapped_")]
    print(f"planted label errors rank {ranks} of {len(issues)} rows in label_issues.csv")


def novel(out):
    import numpy as np

    from pipeline.data.demo import striped_image
    os.makedirs(os.path.join(out, "photos")), os.makedirs(os.path.join(out, "drawings"))
    for c in sorted(os.listdir(SOURCE)):
        for name in sorted(os.listdir(os.path.join(SOURCE, c)), key=_number)[500:510]:
            shutil.copy(os.path.join(SOURCE, c, name), os.path.join(out, "photos", name))
    rng = np.random.default_rng(0)
    for i in range(6):
        striped_image(rng, vertical=i % 2 == 1, pixels=150).save(
            os.path.join(out, "drawings", f"drawing_{i}.jpg"))
    print(f"wrote {out}: 20 photos in no split, 6 drawings")


def flagged(predictions):
    with open(predictions, newline="") as f:
        rows = list(csv.DictReader(f))
    for kind in ("photos", "drawings"):
        mine = [r for r in rows if f"/{kind}/" in r["path"]]
        print(f"{kind}: {sum(r['unlike_training'] == '1' for r in mine)} of {len(mine)} "
              "flagged unlike_training")


def _number(name):
    digits = "".join(ch for ch in name if ch.isdigit())
    return int(digits) if digits else 0


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(sys.argv[2])
    elif sys.argv[1] == "novel":
        novel(sys.argv[2])
    elif sys.argv[1] == "flagged":
        flagged(sys.argv[2])
    else:
        score(sys.argv[3], sys.argv[2])
