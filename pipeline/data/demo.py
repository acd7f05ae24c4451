"""The embedded demo dataset: generated deterministically, offline, in a second.

    python -m pipeline demo-data [--data data/demo]

Two classes of 64x64 pictures that differ in one visual pattern, the orientation of their stripes
("horizontal" vs "vertical"), with random colours, frequencies, phases, blobs and noise, so a
classifier must learn the pattern and nothing else. Even a randomly initialised VGG16 separates
them well above chance, which keeps the offline demo meaningful as a smoke test.
"""
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..config import Config

CLASSES = ("horizontal", "vertical")
PER_CLASS = 150
PIXELS = 64
SEED = 0
STAMP = ".generated"


@dataclass
class DemoDataResult:
    folder: str
    images: int
    created: bool


def striped_image(rng, vertical, pixels=PIXELS):
    """One RGB picture: stripes of random period, phase and colours, a blob, and noise."""
    coords = np.arange(pixels, dtype=np.float32)
    period = rng.uniform(6, 16)
    wave = np.sin(2 * np.pi * coords / period + rng.uniform(0, 2 * np.pi)) > rng.uniform(-0.3, 0.3)
    mask = np.tile(wave[None, :] if vertical else wave[:, None],
                   (pixels, 1) if vertical else (1, pixels))
    colour_a, colour_b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    image = np.where(mask[..., None], colour_a, colour_b)
    yy, xx = np.mgrid[:pixels, :pixels]
    cy, cx, radius = rng.uniform(0, pixels, 2).tolist() + [rng.uniform(4, 14)]
    blob = (yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2
    image[blob] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 12, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")


def generate(folder, per_class=PER_CLASS, seed=SEED, pixels=PIXELS):
    """Write folder/<class>/<class>_NNN.{jpg,png}; every fifth image is a PNG."""
    rng = np.random.default_rng(seed)
    for class_name in CLASSES:
        os.makedirs(os.path.join(folder, class_name), exist_ok=True)
    count = 0
    for index in range(per_class):
        for class_name in CLASSES:
            image = striped_image(rng, vertical=class_name == "vertical", pixels=pixels)
            extension = "png" if index % 5 == 4 else "jpg"
            path = os.path.join(folder, class_name, f"{class_name}_{index:03d}.{extension}")
            image.save(path, quality=90) if extension == "jpg" else image.save(path)
            count += 1
    return count


def run(config: Config) -> DemoDataResult:
    folder = config.told_or_default("data")
    # the Makefile's target: written last, so only when complete
    stamp = os.path.join(folder, STAMP)
    if os.path.exists(stamp):
        print(f"demo data: {folder} is already complete")
        return DemoDataResult(folder, PER_CLASS * len(CLASSES), created=False)
    count = generate(folder)
    with open(stamp, "w") as f:
        f.write(f"{count} images, seed {SEED}\n")
    print(f"demo data: wrote {count} images ({', '.join(CLASSES)}) to {folder}")
    return DemoDataResult(folder, count, created=True)
