"""Helpers the tests import (conftest.py holds only fixtures): tiny deterministic image folders,
the shared real photos, a hand that edits JSON, and stages run once for the whole test run."""
import fcntl
import hashlib
import json
import os
import shutil

import numpy as np
from PIL import Image

from pipeline.data.demo import striped_image

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cats_vs_dogs")


def make_image_folder(root, classes=("horizontal", "vertical"), per_class=6, pixels=40, seed=0):
    """root/<class>/<class>_NN.jpg: striped pictures whose stripe orientation depends on the
    class (a third class, if asked for, gets a checkerboard-like mix of both)."""
    rng = np.random.default_rng(seed)
    for index, class_name in enumerate(classes):
        folder = os.path.join(root, class_name)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            image = striped_image(rng, vertical=index % 2 == 1, pixels=pixels)
            if index >= 2:  # more classes: distinguish by colour as well
                array = np.asarray(image).copy()
                array[..., index % 3] = 255 - array[..., index % 3]
                image = Image.fromarray(array)
            image.save(os.path.join(folder, f"{class_name}_{i:02d}.jpg"), quality=90)
    return str(root)


def edit_json(path, change):
    """Rewrite a JSON file through change(data): what a careless or hostile hand would do."""
    with open(path) as f:
        data = json.load(f)
    change(data)
    with open(path, "w") as f:
        json.dump(data, f)


def tiny_config(root, data, **changes):
    """Config(...) with outputs under root and tiny, fast settings; override any field."""
    from pipeline.config import Config
    # precision: float32 on every machine (auto would pick bfloat16 on a bf16 CPU)
    # augment=0: no views unless a test asks for them (AUGMENT=5 by default)
    defaults = dict(data=str(data), weights="none", size=32, batch_size=4, epochs=3,
                    precision="float32", augment=0, finetune_epochs=1,
                    features_root=os.path.join(root, "features"),
                    models_root=os.path.join(root, "models"))
    # what extract remembers but a later stage may change (config.recorded, binding=False),
    # told as its default, so that a test may read it before a stage resolves the config
    defaults.update({name: Config().told_or_default(name)
                     for name in ("seed", "unfreeze", "finetune_from", "cut_storage")})
    return Config(**{**defaults, **changes})


def built_once(tmp_path_factory, key, build):
    """The folder in which build(folder) ran once for this whole pytest run, xdist's workers
    included (the first builds it under a lock, the others wait, then read it). Nobody may
    change it: copy it first (`copy_folders`)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this run's folder, which its workers share
    root = base / f"built-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    with open(f"{root}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # released when the file closes
        if not (root / ".built").exists():
            shutil.rmtree(root, ignore_errors=True)  # a build that failed halfway
            root.mkdir()
            build(root)
            (root / ".built").touch()
    return root


def copy_folders(source, dest, folders=("data", "features", "models")):
    """dest/<folder> for those of `folders` that source has (copy2 keeps mtimes, so the cache
    sees the same files)."""
    for folder in folders:
        if (source / folder).exists():  # models/: not before train-head
            shutil.copytree(source / folder, dest / folder, symlinks=True)


def prepared_copy(tmp_path_factory, tmp_path, stages, per_class=6, **settings):
    """The Config of tmp_path's own copy of `stages` run on a striped image folder: they run once
    for these arguments (`built_once`), and each test may change or break its copy."""
    def build(root):
        config = tiny_config(str(root), make_image_folder(root / "data", per_class=per_class),
                             **settings)
        for stage in stages:
            stage(config)
    names = [f"{stage.__module__}.{stage.__qualname__}" for stage in stages]
    copy_folders(built_once(tmp_path_factory, repr((names, per_class, sorted(settings.items()))),
                            build), tmp_path)
    return tiny_config(str(tmp_path), tmp_path / "data", **settings)
