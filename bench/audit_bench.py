"""The audit's benchmark on real photos: near-copies, label noise and out-of-distribution images.

    .venv/bin/python bench/audit_bench.py extract WEIGHTS.h5   # once: bench/work/audit_bench/
    .venv/bin/python bench/audit_bench.py score [--part choose|report]

`extract` picks 600 photos of ../shared/data/cats_vs_dogs/train (300 per class, seeded), splits
them into a choose-part and a report-part (150 + 150 each), and writes, per part, 10 edited
copies of distinct originals for every edit below (crops, resizes, brightness, contrast, JPEG,
mirroring, small rotations, alone and combined). It also writes the out-of-distribution set:
300 photos of cats_vs_dogs/validation (in distribution, never trained on), crops of the two
photos scikit-learn ships (real photos of other things), the demo's striped pictures, noise,
gradients and flat shapes (not photographs). Every image goes through pipeline.images.load_image
and the VGG16 base with WEIGHTS at SIZE=150 once; the feature maps are cached in
bench/work/audit_bench/features.npz (about 50 MB) for every `score`.

`score` measures on one part, with the methods of pipeline.analysis (and the former ones, for
the "before" column):
  - near-duplicates, per edit: precision and recall at the default threshold, recall of the
    planted pairs in the top 10, 50 and 100 pairs (set: the part's 300 originals + 10 copies);
  - label issues at 5, 10 and 20% flipped labels of the part's originals: precision and recall
    of the candidates, and how many planted errors are in the top 2 x planted;
  - out-of-distribution: trained on 200 + 200 originals (the other part's photos stand in for
    nothing: both parts' originals are pooled), threshold from 100 held-out originals, the
    share flagged of each kind of new image (the part's half of each kind).
The default threshold and methods were chosen with `--part choose`; `--part report` is the
figure that counts.
"""
import argparse
import io
import os
import sys
import time

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "..", "..", "shared", "data", "cats_vs_dogs")
WORK = os.path.join(HERE, "work", "audit_bench")
SIZE, SEED, PER_CLASS, COPIES = 150, 20261206, 300, 10
OOD_IN_PER_CLASS = 150


def _crop(image, fraction, rng):
    """Remove `fraction` of the width and of the height, split at random between the sides."""
    w, h = image.size
    dw, dh = int(round(w * fraction)), int(round(h * fraction))
    left, top = int(rng.integers(0, dw + 1)), int(rng.integers(0, dh + 1))
    return image.crop((left, top, left + w - dw, top + h - dh))


def _resize(image, scale):
    return image.resize((max(8, int(image.width * scale)), max(8, int(image.height * scale))),
                        Image.BICUBIC)


def _rotate(image, degrees):
    """Rotate and crop to the largest centred rectangle without blank corners."""
    rotated = image.rotate(degrees, resample=Image.BICUBIC)
    w, h = image.size
    a = np.deg2rad(abs(degrees))
    keep = 1.0 / (np.cos(a) + np.sin(a) * max(w, h) / min(w, h))
    cw, ch = int(w * keep), int(h * keep)
    return rotated.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))


def _jpeg(image, quality):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _steps(*steps):
    def apply(image, rng):
        for step in steps:
            image = step(image, rng)
        return image
    return apply


def crop(f):
    return lambda im, rng: _crop(im, f, rng)


def resize(s):
    return lambda im, rng: _resize(im, s)


def bright(b):
    return lambda im, rng: ImageEnhance.Brightness(im).enhance(b)


def contrast(c):
    return lambda im, rng: ImageEnhance.Contrast(im).enhance(c)


def jpeg(q):
    return lambda im, rng: _jpeg(im, q)


def rotate(d):
    return lambda im, rng: _rotate(im, d * (1 if rng.random() < 0.5 else -1))


def mirror():
    return lambda im, rng: ImageOps.mirror(im)


# name -> edit; "combined" ones are what a re-upload does
EDITS = {
    "crop 2%": _steps(crop(0.02)), "crop 5%": _steps(crop(0.05)), "crop 10%": _steps(crop(0.10)),
    "resize 75%": _steps(resize(0.75)), "resize 40%": _steps(resize(0.4)),
    "brightness +15%": _steps(bright(1.15)), "brightness +35%": _steps(bright(1.35)),
    "contrast -20%": _steps(contrast(0.8)), "contrast +30%": _steps(contrast(1.3)),
    "JPEG q70": _steps(jpeg(70)), "JPEG q30": _steps(jpeg(30)),
    "mirror": _steps(mirror()),
    "rotate 3°": _steps(rotate(3)), "rotate 7°": _steps(rotate(7)),
    "combined mild": _steps(crop(0.02), resize(0.9), bright(1.1), jpeg(85)),
    "combined moderate": _steps(crop(0.05), resize(0.75), bright(1.15), contrast(1.1), jpeg(70)),
    "combined strong": _steps(crop(0.10), rotate(3), resize(0.5), bright(1.3), contrast(1.2),
                              jpeg(50)),
    "combined moderate + mirror": _steps(mirror(), crop(0.05), resize(0.75), bright(1.15),
                                         jpeg(70)),
}


def _number(name):
    digits = "".join(ch for ch in name if ch.isdigit())
    return int(digits) if digits else 0


def _originals(rng):
    """[(path, label)] of 300 + 300 train photos; part 0 or 1 of each, alternately."""
    chosen = []
    for label, name in enumerate(("cats", "dogs")):
        folder = os.path.join(SOURCE, "train", name)
        names = sorted(os.listdir(folder), key=_number)
        picked = rng.choice(len(names), PER_CLASS, replace=False)
        chosen += [(os.path.join(folder, names[k]), label) for k in sorted(picked)]
    return chosen


def _not_photos(rng):
    """(kind, PIL image) of pictures that are plainly not photographs."""
    from pipeline.data.demo import striped_image
    out = [("stripes", striped_image(rng, vertical=k % 2 == 1, pixels=SIZE)) for k in range(100)]
    for k in range(40):
        noise = rng.uniform(0, 255, (SIZE, SIZE, 3)) if k % 2 else np.repeat(
            rng.uniform(0, 255, (SIZE, SIZE, 1)), 3, axis=2)
        out.append(("noise", Image.fromarray(noise.astype(np.uint8))))
    yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE
    for k in range(40):
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = (xx * np.cos(k) + yy * np.sin(k))[..., None]
        picture = a * (1 - t) + b * t
        cy, cx, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.1, 0.3)]
        picture[(yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2] = rng.uniform(0, 255, 3)
        out.append(("gradients and shapes", Image.fromarray(np.clip(picture, 0, 255)
                                                            .astype(np.uint8))))
    return out


def _other_photos(rng):
    """(kind, PIL image): 40 crops of scikit-learn's two sample photos (a temple, a flower)."""
    from sklearn.datasets import load_sample_images
    out = []
    for k in range(40):
        photo = load_sample_images().images[k % 2]
        h, w = photo.shape[:2]
        side = int(rng.integers(150, min(h, w)))
        y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
        out.append(("other photos", Image.fromarray(photo[y:y + side, x:x + side])))
    return out


def build(work):
    """Write the images and return the table of what each is."""
    rng = np.random.default_rng(SEED)
    folder = os.path.join(work, "images")
    os.makedirs(folder, exist_ok=True)
    rows = []  # (file, kind, label, origin index, part, edit)
    originals = _originals(rng)
    for k, (path, label) in enumerate(originals):
        rows.append((path, "original", label, k, k % 2, ""))
    for part in (0, 1):
        mine = [k for k in range(len(originals)) if k % 2 == part]
        order = rng.permutation(mine)
        for e, (name, edit) in enumerate(EDITS.items()):
            # 5 cats then 5 dogs, distinct originals for every edit
            cats = [k for k in order if originals[k][1] == 0][e * 5:(e + 1) * 5]
            dogs = [k for k in order if originals[k][1] == 1][e * 5:(e + 1) * 5]
            for k in cats + dogs:
                with Image.open(originals[k][0]) as im:
                    copy = edit(ImageOps.exif_transpose(im).convert("RGB"), rng)
                out = os.path.join(folder, f"copy_{part}_{e}_{k}.jpg")
                copy.save(out, quality=95)
                rows.append((out, "copy", originals[k][1], k, part, name))
    for label, name in enumerate(("cats", "dogs")):
        val = os.path.join(SOURCE, "validation", name)
        names = sorted(os.listdir(val), key=_number)[:OOD_IN_PER_CLASS]
        rows += [(os.path.join(val, n), "new photo", label, -1, i % 2, "")
                 for i, n in enumerate(names)]
    for i, (kind, picture) in enumerate(_not_photos(rng) + _other_photos(rng)):
        out = os.path.join(folder, f"ood_{i}.png")
        picture.convert("RGB").save(out)
        rows.append((out, kind, -1, -1, i % 2, ""))
    return rows


VIEWS = 5        # the default AUGMENT: views of each original (the training rows) only
CUT = "block4_pool"  # VGG16's cut for the default UNFREEZE (the input of block5)


def _file_sha(path):
    import hashlib
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def extract(weights_path):
    """One forward pass per image through a two-output VGG16 base (the cut and the top): the
    top's maps of every image, the cut's maps of every image (float16), and the top's maps and
    the cut's pooled activations of VIEWS augmented views of each original, made as `make
    extract AUGMENT=5` makes them (augment.augment_views, seed 0, keyed by the file's sha256)."""
    import keras

    from pipeline.data import augment, backbones, images
    from pipeline.model import backbone
    rows = build(WORK)
    entry = backbones.get(None)
    base = backbone.build_backbone(backbone.resolve_weights(weights_path), SIZE)
    both = keras.Model(base.input, [base.get_layer(CUT).output, base.output])
    forward = backbone.feature_function(both)
    features = np.empty((len(rows), *backbone.feature_shape(SIZE)), np.float32)
    cut = np.empty((len(rows), *entry.layer_shape(CUT, SIZE)), np.float16)
    originals = [k for k, r in enumerate(rows) if r[1] == "original"]
    view_features = np.empty((len(originals), VIEWS, *features.shape[1:]), np.float32)
    view_cut = np.empty((len(originals), VIEWS, cut.shape[-1]), np.float32)
    shas = {k: _file_sha(rows[k][0]) for k in originals}
    jobs = [(k, 0) for k in range(len(rows))] + [(k, v) for k in originals
                                                  for v in range(1, VIEWS + 1)]
    position = {k: i for i, k in enumerate(originals)}
    start = time.perf_counter()
    for a in range(0, len(jobs), 32):
        batch = jobs[a:a + 32]
        x = np.stack([images.load_image(rows[k][0], SIZE) for k, _ in batch])
        viewed = [i for i, (_, v) in enumerate(batch) if v]
        if viewed:
            x[viewed] = augment.augment_views(x[viewed], [shas[batch[i][0]] for i in viewed],
                                              [batch[i][1] for i in viewed], 0)
        low, top = forward(x)
        for i, (k, v) in enumerate(batch):
            if v:
                view_features[position[k], v - 1] = top[i]
                view_cut[position[k], v - 1] = low[i].mean(axis=(0, 1))
            else:
                features[k], cut[k] = top[i], low[i]
        done = a + len(batch)
        print(f"\r{done} / {len(jobs)} images and views, "
              f"{done / (time.perf_counter() - start):.1f}/s", end="", flush=True)
    print()
    columns = list(zip(*rows))
    np.savez(os.path.join(WORK, "features.npz"), features=features, cut=cut,
             view_rows=np.array(originals), view_features=view_features, view_cut=view_cut,
             kind=np.array(columns[1]), label=np.array(columns[2]), origin=np.array(columns[3]),
             part=np.array(columns[4]), edit=np.array(columns[5]),
             image=np.array([os.path.relpath(p, HERE) for p in columns[0]]))
    print(f"wrote {WORK}/features.npz: {len(rows)} feature maps and cut maps, "
          f"{len(originals)} x {VIEWS} views, {time.perf_counter() - start:.0f} s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("extract").add_argument("weights")
    score_parser = sub.add_parser("score")
    score_parser.add_argument("--part", choices=("choose", "report"), default="choose")
    score_parser.add_argument("--only", nargs="+", choices=("duplicates", "labels", "ood"),
                              default=("duplicates", "labels", "ood"))
    args = parser.parse_args(argv)
    if args.command == "extract":
        extract(args.weights)
    else:
        from audit_bench_score import score
        score(os.path.join(WORK, "features.npz"), 0 if args.part == "choose" else 1, args.only)


if __name__ == "__main__":
    main()
