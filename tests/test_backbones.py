"""BACKBONE=: the one table of frozen bases (data/backbones.py), and every stage following it.

Random weights and 32-pixel images. CI covers vgg16 (the default, a plain chain) and
mobilenetv3large (BatchNormalization, preprocessing inside the model, branches): their end-to-end
runs are heavy tests (`make test-heavy`); the other backbones run the same checks as slow tests
(`make test-slow`).
"""
import os
import re

import h5py
import keras
import numpy as np
import pytest
from helpers import make_image_folder

from pipeline import batch, extract, finetune, predict, report, train_head
from pipeline import evaluate as evaluate_stage
from pipeline.cache import FeatureStore
from pipeline.config import UserError
from pipeline.data import backbones, images
from pipeline.fs import artifacts
from pipeline.model import backbone, finetuning

FAST = ("vgg16", "mobilenetv3large")
SLOW = tuple(name for name in backbones.TABLE if name not in FAST)
EVERY = [*FAST, *(pytest.param(name, marks=pytest.mark.slow) for name in SLOW)]


def test_the_table_holds_at_least_the_backbones_users_can_pick():
    assert {"vgg16", "vgg19", "resnet50v2", "efficientnetv2b0", "efficientnetv2s",
            "convnexttiny", "mobilenetv3large"} <= set(backbones.TABLE)
    assert backbones.DEFAULT == "vgg16"


@pytest.mark.parametrize("device, expected", [
    ("mixed_bfloat16", {"vgg16": "mixed_bfloat16", "mobilenetv3large": "float32"}),
    ("mixed_float16", {"vgg16": "mixed_float16", "mobilenetv3large": "mixed_float16"}),
    ("float32", {"vgg16": "float32", "mobilenetv3large": "float32"})])
def test_precision_auto_follows_the_tables_cpu_preference_of_each_backbone(monkeypatch, device,
                                                                          expected):
    """A CPU with native bfloat16 (auto: mixed_bfloat16) runs MobileNetV3Large in float32, the
    faster there; a GPU's mixed float16 and a told PRECISION stay as they are."""
    monkeypatch.setattr(backbone.runtime, "auto_precision", lambda: device)
    for name, precision in expected.items():
        assert backbone.resolve_precision("auto", backbones.get(name)) == precision
        assert backbone.resolve_precision("mixed_bfloat16", backbones.get(name)) == \
            "mixed_bfloat16"
    assert backbone.resolve_precision("auto") == expected["vgg16"]  # None: the default base


@pytest.mark.parametrize("name", EVERY)
def test_every_stage_output_is_where_the_table_says_with_its_shape(name):
    """Each stage output is a single tensor all layers above depend on (the cut), and its shape
    at several SIZEs is the table's, computed without building the model."""
    entry = backbones.get(name)
    for size in (32, 47, 150):  # built at its size, as the stages do: some pad by the size
        base = backbone.build_backbone(backbone.resolve_weights("none", entry), size, entry=entry)
        for stage in entry.stages + entry.chain:
            tensor = backbone.layer_output(base, entry, stage.output)
            assert tuple(tensor.shape[1:]) == stage.shape(size), (stage.name, size)
            if stage.output != entry.top.output:  # Keras refuses it if a layer above skips it
                assert keras.Model(tensor, base.output).output is not None


@pytest.mark.parametrize("name", EVERY)
def test_random_weights_give_features_float16_keeps(name):
    """WEIGHTS=none is what tests and timings run on: its features must neither vanish (Glorot's
    kernels gave EfficientNetV2 and MobileNetV3 a std of 1e-9 and 1e-11, every value 0 in the
    default float16 storage) nor overflow float16."""
    entry = backbones.get(name)
    weights = backbone.resolve_weights("none", entry)
    assert weights.is_random and entry.random_init in weights.fingerprint
    base = backbone.build_backbone(weights, 32, entry=entry)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    features = keras.ops.convert_to_numpy(base(entry.preprocess(pixels)))
    stored = features.astype(np.float16)
    assert np.isfinite(stored).all() and np.count_nonzero(stored) > 0.2 * stored.size
    assert 1e-3 < features.std() < 1e4


@pytest.mark.parametrize("name", list(backbones.TABLE))
def test_the_loader_applies_the_backbones_preprocessing_and_nothing_else(tmp_path, name):
    folder = make_image_folder(tmp_path, per_class=1)
    path = os.path.join(folder, "horizontal", "horizontal_00.jpg")
    entry = backbones.get(name)
    pixels = images.load_image(path, 32, backbones.get("mobilenetv3large").preprocess)
    assert pixels.min() >= 0 and pixels.max() <= 255 and pixels.max() > 1  # 0-255 RGB
    loaded = images.load_image(path, 32, entry.preprocess)
    np.testing.assert_array_equal(loaded, entry.preprocess(pixels.copy()))
    if name.startswith("vgg"):  # caffe: BGR, ImageNet mean subtracted
        np.testing.assert_allclose(loaded[..., 0], pixels[..., 2] - 103.939, atol=1e-4)
    elif name == "resnet50v2":
        assert loaded.min() >= -1 and loaded.max() <= 1
    else:  # the model holds its own preprocessing: the loader hands it the pixels
        np.testing.assert_array_equal(loaded, pixels)


def test_a_backbone_the_table_lacks_is_refused_in_one_line(make_config, image_folder):
    with pytest.raises(UserError, match="BACKBONE='vgg17' is not one of vgg16, vgg19"):
        extract.run(make_config(image_folder, backbone="vgg17"))


@pytest.mark.parametrize("setting, message", [
    (dict(feature_layer="block9"), "FEATURE_LAYER='block9' is not a stage of BACKBONE=vgg16"),
    (dict(backbone="mobilenetv3large", unfreeze="2"), "UNFREEZE='2'.*names a stage.*stage5"),
    (dict(backbone="mobilenetv3large", unfreeze="block5"), "UNFREEZE='block5' is not a stage"),
])
def test_a_stage_the_backbone_lacks_is_refused_in_one_line(make_config, image_folder, setting,
                                                           message):
    with pytest.raises(UserError, match=message):
        extract.run(make_config(image_folder, **setting))


@pytest.mark.heavy
@pytest.mark.parametrize("name", EVERY)
def test_every_stage_follows_the_backbone_fine_tuning_from_the_cache_included(
        tmp_path, make_config, name):
    data = make_image_folder(tmp_path / "data", per_class=6)
    config = make_config(data, backbone=name, augment=1)
    result = extract.run(config)
    entry = backbones.get(name)
    assert result.identity["backbone"] == entry.identity
    assert entry.preprocess_id in result.identity["preprocess"]
    assert result.cut == entry.stages[-2].output  # the input of the top stage
    train_head.run(config)
    moved = tmp_path / "moved"
    os.rename(data, moved)  # fine-tuning from the cache needs no image
    tuned = finetune.run(config)
    os.rename(moved, data)
    assert tuned.source == "cache" and tuned.trainable_layers
    # what trains is the top stage: the layers above the cut, nothing below
    base = backbone.build_backbone(backbone.resolve_weights("none", entry), 32, entry=entry)
    above = base.layers[[layer.name for layer in base.layers].index(result.cut) + 1:]
    expected = [layer.name for layer in above
                if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)]
    # names Keras numbers itself (ConvNeXt's layer_normalization_1) differ from build to build
    # in one process: compare the layers in order, without that number
    unnumbered = lambda names: [re.sub(r"_\d+$", "", name) for name in names]  # noqa: E731
    assert unnumbered(tuned.trainable_layers) == unnumbered(expected)
    check_batch_norm_stays_in_inference_mode(config)
    evaluate_stage.run(config)
    report.run(config)
    with open(artifacts.path(config, artifacts.REPORT)) as f:
        assert re.search(rf"Backbone: ` {name} `", f.read())
    predicted = predict.run(config.replace(images=os.path.join(data, "vertical"),
                                           model="finetuned"))
    assert predicted.predicted == 6


@pytest.mark.parametrize("model", ["dense", "logreg"])
def test_an_exported_head_sits_on_the_caches_own_backbone(tmp_path, make_config, model):
    """make export-model composed a head with VGG16 whatever the cache's BACKBONE: the exported
    network must give, on the cached images, what the head gives on their cached features."""
    from types import SimpleNamespace

    from pipeline import export_model
    from pipeline.model import registry
    data = make_image_folder(tmp_path / "data", per_class=4)
    config = make_config(data, backbone="mobilenetv3large", split="50/25/25", epochs=1)
    extract.run(config)
    train_head.run(config)
    network = export_model._network(config, SimpleNamespace(model=model, size=32))
    with FeatureStore(config.features_dir) as store:
        rows = np.arange(len(store))
        paths = [os.path.join(store.image_root(config.data), p) for p in store.paths[rows]]
        features = store.read(rows)
    pixels = np.stack([images.load_image(p, 32, backbones.get("mobilenetv3large").preprocess)
                       for p in paths])
    exported = keras.ops.convert_to_numpy(network(pixels))
    on_features = registry.predictor(config, model, calibrated=False)(features)
    if exported.shape[1] == 1:  # a sigmoid: the second class's probability
        exported = np.concatenate([1 - exported, exported], axis=1)
    np.testing.assert_allclose(exported, on_features, atol=1e-4)


def check_batch_norm_stays_in_inference_mode(config):
    """The Keras guide's rule: BatchNormalization layers in the unfrozen stage stay in inference
    mode, so a training step on the cut moves the layers that train, never their moving mean
    and variance."""
    with FeatureStore(config.features_dir) as store:
        weights = backbone.weights_of_cache("", store.attrs)
        model, whole, trainable = finetuning.build_model_on_cut(
            config.replace(lr=1e-2, finetune_warmup=0), weights,
            keras.saving.load_model(artifacts.path(config, artifacts.HEAD)), store)
        rows, cut = store.rows("train")[:4], store.cut["layer"]
        x, y = store.read(rows, "cut_features"), store.labels[rows].astype(np.float32)[:, None]
    base = whole.layers[1]
    names = [layer.name for layer in base.layers]
    above = [layer for layer in base.layers[names.index(cut) + 1:]
             if isinstance(layer, keras.layers.BatchNormalization)]
    before = [(n.moving_mean.numpy(), n.moving_variance.numpy()) for n in above]
    kernel = base.get_layer(trainable[-1]).weights[0].numpy()
    model.train_on_batch(x, y)
    for norm, (mean, variance) in zip(above, before):
        np.testing.assert_array_equal(norm.moving_mean.numpy(), mean)
        np.testing.assert_array_equal(norm.moving_variance.numpy(), variance)
    assert (base.get_layer(trainable[-1]).weights[0].numpy() != kernel).any()  # it trained


def test_rows_of_two_backbones_live_side_by_side_and_switching_back_computes_nothing(
        tmp_path, make_config):
    data = make_image_folder(tmp_path / "data")
    first = extract.run(make_config(data, backbone="mobilenetv3large"))
    assert first.new == 12
    assert extract.run(make_config(data, backbone="vgg16")).new == 12
    back = extract.run(make_config(data, backbone="mobilenetv3large"))
    assert (back.new, back.reused) == (0, 12)
    folders = os.listdir(os.path.join(make_config(data).features_dir, "segments"))
    assert len(folders) == 4  # each backbone's features and its cut


def test_feature_layer_trains_the_heads_on_an_earlier_stage_and_reads_the_cut(tmp_path,
                                                                              make_config):
    data = make_image_folder(tmp_path / "data")
    config = make_config(data, cut_storage="float16")
    extract.run(config)  # the top's features and block4_pool, the cut for UNFREEZE=block5
    earlier = config.replace(feature_layer="block4", storage="float16")
    result = extract.run(earlier)
    assert result.new == 0  # block4's output is the cut extract already keeps
    with FeatureStore(config.features_dir) as store:
        assert store.shape("features") == (2, 2, 512)
        assert store.feature_identity.layer == "block4_pool"
    train_head.run(earlier)
    with h5py.File(result.features_path, "r") as f:
        assert f["features"].shape[1:] == (2, 2, 512)
    out = predict.run(earlier.replace(images=os.path.join(data, "vertical"), model="dense"))
    assert out.predicted == 6
    with pytest.raises(UserError, match="UNFREEZE=block5 trains layers above FEATURE_LAYER"):
        finetune.run(earlier)  # block5 is not in a base that ends at block4


def test_a_weights_file_of_another_backbone_is_refused_in_one_line(tmp_path):
    path = str(tmp_path / "mobilenet.weights.h5")
    keras.applications.MobileNetV3Large(weights=None, include_top=False,
                                        input_shape=(32, 32, 3)).save_weights(path)
    entry = backbones.get("vgg16")
    with pytest.raises(UserError, match="does not fit BACKBONE=vgg16.*VGG16"):
        backbone.build_backbone(backbone.resolve_weights(path, entry), 32, entry=entry)


def test_imagenet_weights_offline_is_one_line_naming_the_backbones_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(keras.utils, "get_file", offline)
    entry = backbones.get("efficientnetv2b0")
    with pytest.raises(UserError, match="ImageNet EfficientNetV2B0 weights.*"
                                        "efficientnetv2-b0_notop.h5.*WEIGHTS=none"):
        backbone.resolve_weights("imagenet", entry)


def test_a_batch_file_names_each_datasets_backbone(tmp_path):
    listing = tmp_path / "datasets.txt"
    listing.write_text('data/a\ndata/b b "" mobilenetv3large\n')
    from pipeline.config import Config
    jobs = batch.jobs_of(Config(batch_file=str(listing)))
    assert [(job.name, job.backbone) for job in jobs] == [("a", ""), ("b", "mobilenetv3large")]
    listing.write_text('data/b b "" vgg61\n')
    with pytest.raises(UserError, match="BACKBONE='vgg61' is not one of"):
        batch.jobs_of(Config(batch_file=str(listing)))


def test_a_random_weights_cache_drawn_another_way_asks_for_extract_again():
    """MobileNetV3's WEIGHTS=none caches from before He-uniform: WEIGHTS=none is no way out."""
    attrs = {"weights": backbone.RANDOM_FINGERPRINT, "weights_spec": "none",
             "backbone": backbones.get("mobilenetv3large").identity}
    with pytest.raises(UserError, match=r"random weights were drawn as random-init:glorot-"
                                        r"uniform.* run `make extract` again"):
        backbone.weights_of_cache("", attrs)


def test_weights_named_for_a_cache_are_those_of_its_backbone(tmp_path, monkeypatch):
    """WEIGHTS=imagenet on a later stage means the ImageNet file of the cache's backbone."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    asked = []
    monkeypatch.setattr(keras.utils, "get_file", lambda name, *a, **k: asked.append(name) or 1 / 0)
    attrs = {"weights": backbone.RANDOM_FINGERPRINT,
             "backbone": backbones.get("mobilenetv3large").identity}
    with pytest.raises(UserError, match="ImageNet MobileNetV3Large weights"):
        backbone.weights_of_cache("imagenet", attrs)
    assert asked == [backbones.get("mobilenetv3large").weights_file]
