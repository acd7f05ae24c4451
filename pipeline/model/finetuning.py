"""The model that fine-tuning trains: the cache's backbone composed with the trained head, the
layers UNFREEZE names set to train, compiled with the optimizer and its warm-up.

Two shapes of one model: `build_model` takes images (FINETUNE_FROM=images), `build_model_on_cut`
takes the cached activations at the cut and shares every layer above it with the whole model
it returns, which is what finetuned.keras saves. `check_composition` proves, before any step, that
the composed model predicts what the head predicts on the cached features.

Imports pipeline.config, data and model; the stage (pipeline/finetune.py) drives it.
"""
import math

import keras
import numpy as np

from ..config import UserError
from ..data import augment
from . import backbone, heads, runtime

MATCH_ATOL = 1e-2  # step 0, composed vs head on cached features: loose enough for GPU TF32 math,
                   # far below what other images, weights or preprocessing would change
RETRAIN = "run `make extract` then `make train-head`"


def build_model(config, weights, head, store, augmented=True):
    """The cache's backbone + the trained head (after the augmentation if `augmented`:
    FINETUNE_AUGMENT), compiled with UNFREEZE's layers and the head trainable. Returns (model,
    names of the base's layers that train).

    The augmentation is on by default, also for a head trained on plain features: with the top
    block training, augmented images fine-tune better than plain ones, and no epoch falls below
    the head (the measurements: bench/QUALITY_NOTES.md, section f)."""
    layers = augment.augmentation(config.seed) if augmented else None
    model, base = compose(weights, head, store.feature_identity, layers)
    trainable = set_trainable(base, config.unfreeze, store.feature_identity)
    # Recompile after changing `trainable`: fit uses the trainable set the model was compiled with.
    compile_for_training(model, config, store)
    return model, trainable


def build_model_on_cut(config, weights, head, store):
    """(model, whole, trainable): `model` maps the cut's activations through the base's layers
    above the cut and the head, and trains; `whole` is image -> probabilities, the frozen layers
    below the cut included. They share every layer above the cut, so `whole` holds what `model`
    learns, and is what finetuned.keras saves."""
    whole, base = compose(weights, head, store.feature_identity)
    trainable = set_trainable(base, config.unfreeze, store.feature_identity)
    cut = base.get_layer(store.cut["layer"])
    if tuple(cut.output.shape[1:]) != tuple(store.shape("cut_features")):
        raise UserError(f"{store.path}'s {cut.name} activations are {store.shape('cut_features')}"
                        f", not {tuple(cut.output.shape[1:])}: {RETRAIN}")
    # a stage output is a single tensor all layers above depend on: this holds all that trains
    above = keras.Model(cut.output, base.output, name="above_cut")
    inputs = keras.Input(cut.output.shape[1:], name=cut.name)
    # inference mode, as in `compose` (BatchNormalization: see set_trainable)
    model = keras.Model(inputs, head(above(inputs, training=False)), name="finetune_on_cut")
    compile_for_training(model, config, store)
    return model, whole, trainable


def compile_for_training(model, config, store):
    """The optimizer (make_optimizer), the loss and accuracy. XLA only under JAX, which has no
    other way to compile: under TensorFlow on the CPU, XLA runs the top block's training steps
    on cached activations slower, as it runs extraction (docs/finetune-from-cache.md), and
    Keras's "auto" would have chosen it for that model."""
    steps = math.ceil(len(store.rows("train")) / config.batch_size)
    model.compile(optimizer=make_optimizer(config, steps),
                  loss=heads.loss_for(len(store.class_names)), metrics=["accuracy"],
                  jit_compile=runtime.backend() == "jax")


def make_optimizer(config, steps_per_epoch):
    """Adam at LR=1e-4 by default, where the article used RMSprop at 1e-5: RMSprop at 1e-5
    moves the top block too little to matter, and at higher rates first loses accuracy, while
    Adam's momentum averages the noisy per-weight steps RMSprop takes (bench/QUALITY_NOTES.md,
    section e)."""
    rate = warmup(config, steps_per_epoch)
    if config.finetune_optimizer == "rmsprop":
        return keras.optimizers.RMSprop(rate)
    return keras.optimizers.Adam(rate)


def warmup(config, steps_per_epoch):
    """The learning rate: from 0 up to LR over FINETUNE_WARMUP epochs, then LR.

    Adaptive optimizers' first steps move every trainable weight by about LR in the sign of its
    gradient, all at once (RMSprop's, whose accumulator starts at 0, by ~LR/sqrt(1 - rho) = 3.2 x
    LR): one such step can flip a trained head's predictions, which the warm-up prevents
    (bench/QUALITY_NOTES.md). CosineDecay with alpha=1 decays nothing: it is Keras's own
    warm-up, saved and restored with the optimizer."""
    if not config.finetune_warmup:
        return config.lr
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=1, alpha=1.0, warmup_target=config.lr,
        warmup_steps=max(1, config.finetune_warmup * steps_per_epoch))


def compose(weights, head, identity, augment_layers=None):
    """image (after load_image) -> probabilities: `augment_layers` (active in training only, as
    in the keras-io transfer-learning guide: seeded, on the GPU with the model, the same on every
    backend), the cache's backbone (`identity`, a backbone.FeatureIdentity), then the trained
    head."""
    base = backbone.build_backbone_of(identity, weights)
    size = identity.image_size
    inputs = keras.Input((size, size, 3), name="image")
    images_in = augment_layers(inputs) if augment_layers is not None else inputs
    # training=False: the base in inference mode, as the Keras guide writes it (its
    # BatchNormalization layers also stay frozen: see set_trainable)
    features = base(images_in, training=False)
    head.trainable = True
    outputs = head(features)  # the head's Dropout is active during fit, as in stage two
    return keras.Model(inputs, outputs, name="finetuned"), base


def set_trainable(base, unfreeze, identity):
    """Freeze every layer of `base` (the backbone of `identity`, a FeatureIdentity) up to
    UNFREEZE's cut (backbone.unfreeze_cut, a stage or, for a plain chain, a count of top conv
    layers), and every BatchNormalization. Returns the names of the base's layers that train."""
    cut = backbone.unfreeze_cut(identity, unfreeze)
    # the layers are in topological order, and the cut is a single tensor that every layer
    # above depends on: exactly the layers after it train
    names = [layer.name for layer in base.layers]
    first = (0 if cut is None else len(names) if cut == identity.output_layer
             else names.index(cut) + 1)
    base.trainable = True
    for at, layer in enumerate(base.layers):
        # BatchNormalization stays frozen, which in Keras 3 keeps it in inference mode (the Keras
        # transfer-learning guide's rule): small batches' statistics would overwrite the moving
        # ones the pretrained layers rely on; a call's training=False alone did not hold them
        layer.trainable = at >= first and not isinstance(
            layer, (keras.layers.InputLayer, keras.layers.BatchNormalization))
    return [layer.name for layer in base.layers if layer.trainable and layer.weights]


def check_composition(model, head, image_batches, features):
    """Before any training step the composed model must predict what the head predicts on the
    cached features of the same images (or, from the cache, the model on the cut's activations
    of those images); otherwise the cache and the images disagree.
    Returns (composed predictions, head predictions)."""
    composed = model.predict(image_batches, verbose=0)
    cached = head.predict(features, verbose=0)
    gap = float(np.max(np.abs(composed - cached))) if len(features) else 0.0
    if not gap <= MATCH_ATOL:
        raise UserError(f"the backbone + head predict differently (by {gap:.2g}) from the head on "
                        f"the cached features of the same images: the cache is stale; {RETRAIN}")
    return composed, cached
