"""The one table of backbones: everything that differs between the frozen bases BACKBONE= picks.

Each entry says how to build the base (a keras.applications constructor, without its classifier),
what the one loader (images.load_image) applies after decoding (its `preprocess`: several bases
include their preprocessing inside the model, and then the loader hands them 0-255 RGB), where to
find its ImageNet weights, and its *stages*, bottom to top. A stage's output is a layer through
which everything above it flows (a single tensor), so that

    UNFREEZE=<stage>        trains that stage and every one above it;
    the cut                 the input of UNFREEZE's stage (the output of the stage below) is what
                            extract caches and fine-tuning from the cache starts from;
    FEATURE_LAYER=<stage>   the heads train on that stage's output (default: the top, the base's
                            output).

A stage's output shape at any SIZE is known without building the model: its channels, and how
each halving of the side rounds (`f`: down, a valid pooling; `c`: up, a "same" stride-2 conv).

This module imports no Keras (it names the preprocessing's module, imported when it runs) and
builds no model (model/backbone.py does, from here), so the cache reads identities with it.
"""
import importlib
from dataclasses import dataclass

from ..config import UserError

DEFAULT = "vgg16"  # the article's base
KERAS_WEIGHTS = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclass(frozen=True)
class Stage:
    name: str       # what UNFREEZE and FEATURE_LAYER call it
    output: str     # the Keras layer whose output is the stage's; the top one's is the base's
    channels: int
    halvings: str   # one letter per halving of the side from the image: f (floor) or c (ceil)

    def shape(self, size):
        side = size
        for rounding in self.halvings:
            side = side // 2 if rounding == "f" else -(-side // 2)
        return (side, side, self.channels)


@dataclass(frozen=True)
class Backbone:
    name: str             # BACKBONE=
    constructor: str      # the keras.applications function
    stages: tuple         # Stage, bottom to top
    weights_file: str     # its ImageNet weights without the classifier, in Keras's cache
    weights_url: str
    weights_hash: str     # the hash Keras itself checks (md5 or sha256)
    preprocess_id: str    # part of the cache identity: what `preprocess` computes
    # the keras.applications module whose preprocess_input the loader applies to 0-255 RGB
    # float32 ("": the model does it itself)
    preprocess_module: str = ""
    # a base that is a plain chain of layers lists them all (Stage each): any of them can be the
    # cut, and UNFREEZE may also count its top convolutions
    chain: tuple = ()
    # PRECISION=auto on a CPU with native bfloat16 (runtime.auto_precision): False where this
    # base ran faster in float32 than in mixed bfloat16 there (docs/backbones.md, measured)
    cpu_bfloat16: bool = True
    # WEIGHTS=none's kernels (model/backbone.py _random_init): "he-uniform" where Glorot's make
    # the features vanish (std 1e-9 and 1e-11 at SIZE=64, all 0 in float16): the bases of
    # depthwise convolutions and squeeze-and-excitation
    random_init: str = "glorot-uniform"

    @property
    def identity(self):
        """The `backbone` of its cache identity."""
        return f"keras.applications.{self.constructor}(include_top=False)"

    @property
    def top(self):
        return self.stages[-1]

    def preprocess(self, pixels):
        """0-255 RGB float32 images (numpy, or a Keras tensor: an exported graph can include
        it) -> this base's input, as the loader gives it."""
        if not self.preprocess_module:
            return pixels
        module = importlib.import_module(f"keras.applications.{self.preprocess_module}")
        return module.preprocess_input(pixels)

    def stage(self, name, variable):
        """The Stage called `name`, or one line naming the choices (`variable`: the setting)."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise UserError(f"{variable}={name!r} is not a stage of BACKBONE={self.name}: use one of "
                        f"{', '.join(s.name for s in self.stages)} (e.g. {variable}="
                        f"{self.top.name})")

    def layer(self, name):
        """The Stage whose output layer is `name` (what caches record), or None."""
        return next((stage for stage in self.stages + self.chain if stage.output == name), None)

    def position(self, layer):
        """Where `layer` (a stage output, or a layer of the chain) lies, bottom to top."""
        points = [stage.output for stage in (self.chain or self.stages)]
        return points.index(layer)

    def layer_shape(self, layer, size):
        """The shape of one image's output of `layer` (a stage's output) at SIZE."""
        stage = self.layer(layer)
        if stage is None:
            raise UserError(f"{layer!r} is not a stage output of BACKBONE={self.name}")
        return stage.shape(size)

    def unfreeze_stage(self, unfreeze):
        """UNFREEZE as a stage name; empty means the top stage."""
        return str(unfreeze).strip() or self.top.name

    def cut_of(self, unfreeze):
        """The layer whose output is the input of the lowest layer UNFREEZE trains: fine-tuning's
        input. None when everything trains (its input is the image); the top layer itself when
        nothing does (UNFREEZE=0)."""
        text = self.unfreeze_stage(unfreeze)
        convs = [at for at, layer in enumerate(self.chain) if "_conv" in layer.output]
        if text.isdigit() and (self.chain or text == "0"):
            count = int(text)
            if count > len(convs if self.chain else ()):
                raise UserError(f"UNFREEZE={unfreeze!r} counts more than the {len(convs)} "
                                f"convolutional layers of BACKBONE={self.name}: use 0-"
                                f"{len(convs)} or a stage ({self.top.name})")
            if count == 0:
                return self.top.output
            first = convs[len(convs) - count]
            return self.chain[first - 1].output if first else None
        if text.isdigit():
            raise UserError(f"UNFREEZE={unfreeze!r}: BACKBONE={self.name} is not a plain chain of "
                            f"layers, so UNFREEZE names a stage: one of "
                            f"{', '.join(s.name for s in self.stages)}, or 0")
        at = self.stages.index(self.stage(text, "UNFREEZE"))
        return self.stages[at - 1].output if at else None


def _vgg(name, constructor, convs, weights_hash):
    stages = tuple(Stage(f"block{b}", f"block{b}_pool", (64, 128, 256, 512, 512)[b - 1], "f" * b)
                   for b in range(1, 6))
    chain = tuple(Stage(layer, layer, stage.channels, "f" * (b - 1 + (layer == stage.output)))
                  for b, (n, stage) in enumerate(zip(convs, stages), 1)
                  for layer in [f"block{b}_conv{i}" for i in range(1, n + 1)] + [stage.output])
    file = f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5"
    return Backbone(name, constructor, stages, file, f"{KERAS_WEIGHTS}{name}/{file}", weights_hash,
                    f"keras.{name}.preprocess_input(caffe)", name, chain)


def _stages(*rows):
    return tuple(Stage(*row) for row in rows)


_EFFICIENTNET_V2 = "keras.efficientnet_v2: inside the model (include_preprocessing)"

TABLE = {entry.name: entry for entry in (
    _vgg("vgg16", "VGG16", (2, 2, 3, 3, 3), "6d6bbae143d832006294945121d1f1fc"),
    _vgg("vgg19", "VGG19", (2, 2, 4, 4, 4), "253f8cb515780f3b799900260a226db6"),
    Backbone("resnet50v2", "ResNet50V2", _stages(
        ("conv1", "pool1_pool", 64, "cc"), ("conv2", "conv2_block3_out", 256, "ccc"),
        ("conv3", "conv3_block4_out", 512, "cccc"), ("conv4", "conv4_block6_out", 1024, "ccccc"),
        ("conv5", "post_relu", 2048, "ccccc")),
        "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        f"{KERAS_WEIGHTS}resnet/resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "fac2f116257151a9d068a22e544a4917", "keras.resnet_v2.preprocess_input(tf)",
        "resnet_v2"),
    Backbone("efficientnetv2b0", "EfficientNetV2B0", _stages(
        ("block1", "block1a_project_activation", 16, "c"), ("block2", "block2b_add", 32, "cc"),
        ("block3", "block3b_add", 48, "ccc"), ("block4", "block4c_add", 96, "cccc"),
        ("block5", "block5e_add", 112, "cccc"), ("block6", "top_activation", 1280, "ccccc")),
        "efficientnetv2-b0_notop.h5", f"{KERAS_WEIGHTS}efficientnet_v2/efficientnetv2-b0_notop.h5",
        "893217f2bb855e2983157299931e43ff", _EFFICIENTNET_V2, random_init="he-uniform"),
    Backbone("efficientnetv2s", "EfficientNetV2S", _stages(
        ("block1", "block1b_add", 24, "c"), ("block2", "block2d_add", 48, "cc"),
        ("block3", "block3d_add", 64, "ccc"), ("block4", "block4f_add", 128, "cccc"),
        ("block5", "block5i_add", 160, "cccc"), ("block6", "top_activation", 1280, "ccccc")),
        "efficientnetv2-s_notop.h5", f"{KERAS_WEIGHTS}efficientnet_v2/efficientnetv2-s_notop.h5",
        "af0682fb74e8c54910f2d4393339c070", _EFFICIENTNET_V2, random_init="he-uniform"),
    # each stage here ends with the downsampling into the next (as a VGG block with its pooling):
    # the downsampling layers are the only named single-tensor points between stages
    Backbone("convnexttiny", "ConvNeXtTiny", _stages(
        ("stage0", "convnext_tiny_downsampling_block_0", 192, "fff"),
        ("stage1", "convnext_tiny_downsampling_block_1", 384, "ffff"),
        ("stage2", "convnext_tiny_downsampling_block_2", 768, "fffff"),
        ("stage3", "convnext_tiny_output", 768, "fffff")),
        "convnext_tiny_notop.h5", f"{KERAS_WEIGHTS}convnext/convnext_tiny_notop.h5",
        "d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1",
        "keras.convnext: inside the model (include_preprocessing)"),
    # stages by resolution: blocks 0 | 1-2 | 3-5 | 6-11 | 12-14 and the 960-channel conv (its
    # padding is computed from the input size, which the pipeline always builds it with)
    Backbone("mobilenetv3large", "MobileNetV3Large", _stages(
        ("stage1", "expanded_conv_add", 16, "c"), ("stage2", "expanded_conv_2_add", 24, "cc"),
        ("stage3", "expanded_conv_5_add", 40, "ccc"),
        ("stage4", "expanded_conv_11_add", 112, "cccc"),
        ("stage5", "mobilenetv3large_output", 960, "ccccc")),
        "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
        f"{KERAS_WEIGHTS}mobilenet_v3/weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
        "07fb09a5933dd0c8eaafa16978110389",
        "keras.mobilenet_v3: inside the model (include_preprocessing)", cpu_bfloat16=False,
        random_init="he-uniform"),
)}


def get(name):
    """The entry BACKBONE=name, or one line naming the choices."""
    entry = TABLE.get(str(name).strip().lower() if name else DEFAULT)
    if entry is None:
        raise UserError(f"BACKBONE={name!r} is not one of {', '.join(TABLE)}: use e.g. "
                        f"BACKBONE={DEFAULT}")
    return entry


def of_identity(backbone_id):
    """The entry whose cache identity names `backbone_id`, or None (not a backbone of ours)."""
    return next((e for e in TABLE.values() if e.identity == backbone_id), None)
