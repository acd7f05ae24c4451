"""Helpers the tests import (conftest.py holds only fixtures): tiny deterministic image folders,
the shared real photos, and a hand that edits JSON."""
import json
import os
import shutil

import numpy as np
from PIL import Image

from pipeline.demo_data import striped_image

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


def prepare_trained(root, **settings):
    """A cache of 12 striped images and a trained head under root (data/, features/, models/):
    what a module-scoped fixture makes once for its tests to copy (`private_copy`)."""
    from pipeline import extract, train_head
    from pipeline.config import Config
    data = make_image_folder(root / "data", per_class=6)
    config = Config(data=data, weights="none", size=32, batch_size=4, precision="float32",
                    features_root=str(root / "features"), models_root=str(root / "models"),
                    **settings)
    extract.run(config)
    train_head.run(config)
    return root


def private_copy(prepared, tmp_path):
    """tmp_path/{data,features,models}: a test's own copy of `prepare_trained`'s folders (copy2
    keeps mtimes, so the cache sees the same files); returns the data folder."""
    for folder in ("data", "features", "models"):
        shutil.copytree(prepared / folder, tmp_path / folder)
    return tmp_path / "data"
