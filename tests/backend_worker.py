"""Every stage under one Keras backend, in a process of its own (Keras picks its backend once per
process), for tests/test_backends.py:

    KERAS_BACKEND=jax python tests/backend_worker.py ROOT DATA WEIGHTS MODELS_OF_ANOTHER_BACKEND

Runs extract, train-head, finetune, evaluate, predict, report and batch under ROOT, scores the
other backend's saved models on the same inputs, applies the augmentation twice, and writes
ROOT/worker.npz and ROOT/worker.json.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.model import runtime  # noqa: E402

runtime.start()  # KERAS_BACKEND, quietly

import keras  # noqa: E402
import numpy as np  # noqa: E402

from pipeline import batch, cache, evaluate, extract, finetune, predict, report, train_head  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.data import augment, images  # noqa: E402
from pipeline.model import registry  # noqa: E402


def stages(root, data, weights):
    config = Config(data=data, name="tiny", augment=0, weights=weights, size=32, batch_size=4,
                    split="40/30/30", epochs=2, finetune_epochs=1, seed=0, precision="float32",
                    features_root=os.path.join(root, "features"),
                    models_root=os.path.join(root, "models"), images=data)
    extract.run(config)
    train_head.run(config)
    finetune.run(config)
    evaluate.run(config)
    predict.run(config)
    report.run(config)
    batch.run(config.replace(datasets=(data,), name="", finetune=False))
    return config


def inputs(config):
    """The cache's features and the validation images, sorted by content hash."""
    with cache.FeatureStore(config.features_dir) as store:
        order = np.argsort(store.sha256)
        features = store.read(np.arange(len(store)))[order]
        paths = [os.path.join(config.data, p) for p in store.paths[order]]
    pictures = np.stack([images.load_image(p, 32) for p in paths])
    return features, pictures


def main(root, data, weights, other_models):
    config = stages(root, data, weights)
    features, pictures = inputs(config)
    out = {"features": features}
    for label, models_root in (("own", config.models_root), ("other", other_models)):
        if not models_root:
            continue
        theirs = config.replace(models_root=models_root)
        out[f"{label}_dense"] = registry.predictor(theirs, "dense")(features)
        out[f"{label}_finetuned"] = registry.predictor(theirs, "finetuned")(pictures)
    # the augmentation: the same seed draws the same views; a second call draws new ones
    layers, x = augment.augmentation(seed=0), pictures[:4]
    out["augmented"] = [layers(x, training=True), layers(x, training=True),
                        augment.augmentation(seed=0)(x, training=True)]
    np.savez(os.path.join(root, "worker.npz"),
             **{k: np.asarray([keras.ops.convert_to_numpy(x) for x in v]
                               if isinstance(v, list) else v)
                for k, v in out.items()})
    with open(os.path.join(root, "worker.json"), "w") as f:
        json.dump({"backend": runtime.backend(), "tensorflow_imported": "tensorflow" in sys.modules,
                   "versions": cache.master_attribute(config.features_dir, "versions")}, f)


if __name__ == "__main__":
    main(*sys.argv[1:4], sys.argv[4] if len(sys.argv) > 4 else "")
