"""Every setting of the pipeline, with its default and its help, in one place.

Each field of `Config` is one setting: the Makefile variable of the same name in capitals (DATA,
NAME, SIZE, ...) and the CLI option `--data`, `--name`, `--size`, ... (`__main__.py`). Its help
text, below, is what `python -m pipeline --help` and `make help` print. A variable left empty
keeps the default written here. Every run saves the whole config with what it made.

The settings extract records in the cache (`recorded`: those that define a dataset and its rows,
DATA, SIZE, AUGMENT, ..., and, not binding, what it cached for later stages: SEED, UNFREEZE, ...)
are None in a Config until pipeline.cache.settings.resolve fills them at a stage's start: with
the value the cache recorded when extract made it, else the default written here. None is how a
stage tells "not told" from "told the default".
"""
import dataclasses
import difflib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field

# what the pipeline says to its user, which most of the package imports from here
from .messages import UserError, hints_about, terminal_text, warn, with_name  # noqa: F401

MIN_SIZE, MAX_SIZE = 32, 1024  # every backbone halves the side 5 times: 32 px give a 1x1 map
MAX_BATCH = 1024
# SIZE x SIZE x BATCH_SIZE must leave room: the default backbone's first block holds the input and
# two 64-channel float32 maps per image at once (ACTIVATION_CHANNELS), the peak of a forward pass
# (the other backbones downsample sooner, and peak lower). Past this share of the machine's
# memory, a run would end in the kernel's out-of-memory killer, unheard.
MEMORY_SHARE = 0.5
ACTIVATION_CHANNELS = 3 + 64 + 64
# A dataset name becomes one folder under features/ and models/, typed in shells and Makefiles:
# letters and digits of any script, then also space and _ . , - + = @ ~ ( ) [ ] { }. That rules
# out separators, "." and "..", hidden folders, glob stars, quotes and control characters.
# The choices of MODEL and BACKEND, here so that config imports no other module of the package:
# registry.KINDS and runtime use them.
MODEL_NAMES = ("logreg", "dense", "finetuned")
BACKENDS = ("tensorflow", "jax", "torch")
EXPORT_FORMATS = ("savedmodel", "onnx", "litert")
NAME_PUNCTUATION = " _.,-+=@~()[]{}"  # beside letters and digits, after the first character
NAME_LENGTH = 100
NAME_PATTERN = re.compile(rf"\w[\w{re.escape(NAME_PUNCTUATION)}]{{0,{NAME_LENGTH - 1}}}")
NAME_RULE = (f"up to {NAME_LENGTH} letters, digits and {' '.join(NAME_PUNCTUATION[1:])} or "
             "spaces, starting with a letter, digit or _")



def setting(default, help, make=True):
    """A field with its help text; make=False: a CLI option only, no Makefile variable."""
    return field(default=default, metadata={"help": help, "make": make, "default": default})


def recorded(default, help, binding=True):
    """A setting that extract records in the cache and later stages take from it: None (not
    told) until resolved; `default` applies where the cache records none. binding=False: a
    later stage may be told another value (SEED, UNFREEZE: what it trains, not what the cache
    is); binding: it is refused (cache.settings)."""
    return field(default=None, metadata={"help": help, "make": True, "default": default,
                                         "recorded": True, "binding": binding})


@dataclass(frozen=True)
class Config:
    # --- dataset -------------------------------------------------------------------------------
    data: str = recorded("data/demo", "the images: DATA/<class>/* or "
                                      "DATA/{train,validation,test}/<class>/*")
    name: str = setting("", "the dataset's folder in features/ and models/; default: the name of "
                            "DATA's folder")
    split: str = recorded("80/10/10", "train/validation/test percentages, by content hash "
                                      "(DATA/<class>/ layout)")
    labels: str = recorded("", "a CSV of file name and label, for a flat folder of images")
    label_columns: str = recorded("filename,label", "the labels CSV's file-name and label columns")
    # --- what runs it ---------------------------------------------------------------------------
    backend: str = setting("", "the Keras backend: tensorflow | jax | torch; empty: KERAS_BACKEND, "
                               "else tensorflow")
    verbose: bool = setting(False, "1: also show the frameworks' own start-up and log lines")
    # --- the backbone and the cache's identity --------------------------------------------------
    backbone: str = recorded("vgg16", "the frozen base, from keras.applications: vgg16 | vgg19 | "
                                      "resnet50v2 | efficientnetv2b0 | efficientnetv2s | "
                                      "convnexttiny | mobilenetv3large (docs/backbones.md); part "
                                      "of the cache identity")
    feature_layer: str = recorded("", "the stage of BACKBONE whose output the heads train on "
                                      "(e.g. block4); empty: the top of the base")
    weights: str = recorded("imagenet", "imagenet | none | auto (demo only) | <file.h5>")
    size: int = recorded(150, "images are resized to SIZE x SIZE pixels (32 to 1024)")
    batch_size: int = setting(32, "images (or feature maps) per step")
    precision: str = recorded("auto", "auto (mixed_float16 on a GPU, mixed_bfloat16 on a CPU with "
                                      "native bfloat16 where the backend uses it and the BACKBONE "
                                      "gains from it, else float32) | "
                                      "float32 | mixed_float16 | mixed_bfloat16; part of the cache "
                                      "identity")
    storage: str = recorded("float32", "float32 | float16: half the disk and read I/O, features "
                                       "rounded to ~3 digits; part of the cache identity")
    # 5 by default: finetune then trains from the cache (docs/finetune-from-cache.md)
    augment: int = recorded(5, "extract also caches AUGMENT augmented views of every training "
                                "image (flips, rotations, zooms, shifts); train-head and finetune "
                                "read each image as another view every epoch. 0: plain features "
                                "only (finetune then decodes and augments the images)")
    # --- where extract runs ----------------------------------------------------------------------
    engine: str = setting("local", "local (this process) | ray: hash and extract on a Ray cluster "
                                   "(pip install -r requirements-ray.txt; the Makefile does it)")
    ray_address: str = setting("", "ENGINE=ray: the cluster to join (ray://host:10001, host:6379, "
                                   "auto); empty: Ray's RAY_ADDRESS, else a cluster started on "
                                   "this machine for the run")
    workers: int = setting(0, "ENGINE=ray: extraction actors; 0: one per GPU, or without GPUs "
                              "one per node-sized share of the CPUs")
    # --- stage two: heads on the cached features -------------------------------------------------
    head: str = setting("both", "which heads train-head trains: dense | logreg | both")
    epochs: int = setting(30, "dense head epochs (early stopping usually ends sooner)")
    hidden_units: int = setting(256, "units of the dense head's hidden layer")
    dropout: float = setting(0.5, "dropout rate before the dense head's output")
    head_pool: int = setting(2, "the dense head first averages POOLxPOOL cells of the feature "
                                "map (1: the article's Flatten of the whole map)")
    head_lr: float = setting(1e-4, "the dense head's Adam learning rate")
    patience: int = setting(5, "dense head epochs without a lower validation loss before stopping")
    c_grid: str = setting("1e-4,1e-3,1e-2,1e-1,1", "logreg's inverse regularisation strengths, "
                                                   "one chosen on the validation split")
    seed: int = recorded(0, "one seed for initialisation, dropout, shuffles and augmentation "
                            "(extract's: the views it caches)", binding=False)
    class_weight: str = setting("auto", "auto | balanced | none: weigh each class's training "
                                        "images by images / (classes x its images), so that a "
                                        "small class counts as much as a large one, in the "
                                        "dense head, logreg and fine-tuning; auto: only when "
                                        "the largest class has over 1.5x the images of the "
                                        "smallest")
    # --- stage three: fine-tuning ----------------------------------------------------------------
    unfreeze: str = recorded("", "the lowest stage of BACKBONE that fine-tuning trains (block5 of "
                                "vgg16, conv5 of resnet50v2...; a plain chain such as vgg16 also "
                                "takes a count of top convolutional layers; 0: none); empty: "
                                "its top stage", binding=False)
    finetune_from: str = recorded("cache", "cache: extract also caches the activations that "
                                          "fine-tuning starts from (the input of UNFREEZE's "
                                          "lowest layer, for every AUGMENT view) and finetune "
                                          "trains on them, decoding no image; images: finetune "
                                          "decodes and augments the images every epoch",
                                   binding=False)
    cut_storage: str = recorded("float16", "float16 | float32: how FINETUNE_FROM=cache's "
                                          "activations are kept (float16: half the disk); part "
                                          "of their identity", binding=False)
    finetune_epochs: int = setting(10, "fine-tuning epochs (early stopping may end sooner)")
    finetune_optimizer: str = setting("adam", "adam | rmsprop (the article's): fine-tuning's "
                                              "optimizer")
    finetune_augment: bool = setting(True, "1: fine-tuning trains on augmented images (flips, "
                                           "rotations, zooms, shifts), as the article does; 0: "
                                           "on the plain images (for classes a flip changes)")
    lr: float = setting(1e-4, "fine-tuning learning rate: low, so the pretrained filters are "
                              "adjusted, not wiped out (the article's RMSprop: 1e-5)")
    finetune_warmup: int = setting(1, "fine-tuning epochs over which the learning rate rises "
                                      "from 0 to LR (0: LR from the first step)")
    # 5, not 3: the validation loss swings for an epoch or two (docs/finetune-from-cache.md)
    finetune_patience: int = setting(5, "fine-tuning epochs without a lower validation loss "
                                        "before stopping")
    fresh: bool = setting(False, "1: ignore an interrupted fine-tuning's backup and start over")
    # --- prediction and export -------------------------------------------------------------------
    images: str = setting("", "the image file or folder that predict classifies")
    model: str = setting("auto", "the model predict uses: auto (best validation accuracy) | "
                                 "logreg | dense | finetuned")
    out: str = setting("", "the file `make export` writes (never overwritten); the CSV `make "
                           "predict` writes (default models/<NAME>/predictions.csv)")
    top_k: int = setting(1, "predict: the most likely classes shown per image")
    format: str = setting("savedmodel", "`make export-model`: savedmodel | onnx (needs pip "
                                        "install -e '.[onnx]') | litert")
    # --- many datasets ---------------------------------------------------------------------------
    datasets: tuple = setting((), "dataset folders for `make batch`")
    batch_file: str = setting("", "a file with one `folder [name] [labels.csv]` per line, for "
                                  "`make batch`")
    finetune: bool = setting(True, "0: `make batch` skips fine-tuning")
    force: bool = setting(False, "1: `make batch` retrains datasets that did not change")
    # --- the audit of the cache (`make audit`, docs/audit.md) -----------------------------------
    duplicate_threshold: float = setting(0.6, "audit: two different images whose feature maps' "
                                              "descriptors are at least this similar are listed "
                                              "as near-duplicates (0 to 1; edited copies of "
                                              "photos score ~0.6-1, distinct photos < 0.6: "
                                              "docs/audit.md)")
    audit_folds: int = setting(5, "audit: cross-validation folds for the out-of-fold label "
                                  "probabilities (2 or more; every class needs this many images)")
    outlier_percentile: float = setting(99.0, "audit and predict: an image is unlike the "
                                              "training data past this percentile of the "
                                              "validation images' distance to the nearest "
                                              "training class")
    # --- where outputs go ------------------------------------------------------------------------
    features_root: str = setting("features", "the folder of every dataset's cache", make=False)
    models_root: str = setting("models", "the folder of every dataset's models", make=False)

    def __post_init__(self):
        """Refuse a bad setting here, with one line naming the fix, before any work starts:
        a deep traceback or a run that trains on nonsense (LR=-1) helps nobody."""
        self._check_name()
        told = self.told_or_default  # a recorded setting not told: its default, which is valid
        _check_range("SIZE", told("size"), MIN_SIZE, MAX_SIZE, "the images' side in pixels")
        _check_range("BATCH_SIZE", self.batch_size, 1, MAX_BATCH, "images per step")
        _check_range("EPOCHS", self.epochs, 1, 100_000, "head epochs")
        _check_range("FINETUNE_EPOCHS", self.finetune_epochs, 1, 100_000, "fine-tuning epochs")
        _check_range("SEED", told("seed"), 0, 2**32 - 1, "a non-negative integer")
        _check_range("AUGMENT", told("augment"), 0, 1000, "augmented views per training image")
        _check_range("HIDDEN_UNITS", self.hidden_units, 1, 65_536, "units")
        _check_range("HEAD_POOL", self.head_pool, 1, 32, "cells averaged per side")
        _check_range("PATIENCE", self.patience, 1, 100_000, "epochs")
        _check_range("FINETUNE_PATIENCE", self.finetune_patience, 1, 100_000, "epochs")
        _check_range("FINETUNE_WARMUP", self.finetune_warmup, 0, 100_000, "epochs")
        _check_rate("LR", self.lr, "such as LR=1e-4")
        _check_rate("HEAD_LR", self.head_lr, "such as HEAD_LR=1e-4")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise UserError(f"DROPOUT={self.dropout!r} is not a rate: use 0 <= DROPOUT < 1")
        self.c_values  # noqa: B018 (parses C_GRID, raising on a bad one)
        self.split_fractions  # noqa: B018 (parses SPLIT, raising on a bad one)
        _check_choice("HEAD", self.head, ("dense", "logreg", "both"))
        _check_choice("CLASS_WEIGHT", self.class_weight, ("auto", "balanced", "none"))
        _check_choice("FINETUNE_OPTIMIZER", self.finetune_optimizer, ("adam", "rmsprop"))
        _check_choice("MODEL", self.model, ("auto", *MODEL_NAMES))
        _check_range("TOP_K", self.top_k, 1, 1000, "classes shown per image")
        _check_choice("FORMAT", self.format, EXPORT_FORMATS)
        _check_choice("PRECISION", told("precision"),
                      ("auto", "float32", "mixed_float16", "mixed_bfloat16"))
        _check_choice("STORAGE", told("storage"), ("float32", "float16"))
        _check_choice("CUT_STORAGE", told("cut_storage"), ("float32", "float16"))
        _check_choice("FINETUNE_FROM", told("finetune_from"), ("cache", "images"))
        if self.backend:  # empty: KERAS_BACKEND, else tensorflow
            _check_choice("BACKEND", self.backend, BACKENDS)
        _check_choice("ENGINE", self.engine, ("local", "ray"))
        _check_range("WORKERS", self.workers, 0, 100_000, "extraction actors, 0: automatic")
        _check_memory(told("size"), self.batch_size)
        _check_fraction("DUPLICATE_THRESHOLD", self.duplicate_threshold, 0, 1)
        _check_range("AUDIT_FOLDS", self.audit_folds, 2, 100, "cross-validation folds")
        _check_fraction("OUTLIER_PERCENTILE", self.outlier_percentile, 0, 100)

    def _check_name(self):
        name = self.dataset_name
        if not NAME_PATTERN.fullmatch(name):
            given = f"NAME={self.name!r}" if self.name else f"DATA={self.data!r} (its folder name)"
            raise UserError(f"{given} is not a dataset name: it names one folder in features/ and "
                            f"models/: pass NAME=<{NAME_RULE}>")

    def told_or_default(self, name):
        """A recorded setting's value: as told, else its default (before `resolve`)."""
        value = getattr(self, name)
        return FIELDS[name].metadata["default"] if value is None else value

    @property
    def dataset_name(self) -> str:
        return self.name or os.path.basename(os.path.normpath(self.told_or_default("data")))

    @property
    def features_dir(self) -> str:
        return os.path.join(self.features_root, self.dataset_name)

    @property
    def models_dir(self) -> str:
        return os.path.join(self.models_root, self.dataset_name)

    @property
    def split_fractions(self) -> tuple:
        """"80/10/10" -> (0.8, 0.1, 0.1)."""
        split = self.told_or_default("split")
        try:
            parts = [float(p) for p in split.split("/")]
        except (ValueError, AttributeError):
            parts = []
        if (len(parts) != 3 or not all(map(math.isfinite, parts)) or min(parts) < 0
                or parts[0] == 0 or parts[1] == 0):
            raise UserError(f"SPLIT={split!r} is not train/validation/test percentages with "
                            "a train and a validation share (validation picks the best epoch): "
                            "use e.g. SPLIT=80/10/10 or 80/20/0")
        total = sum(parts)
        return tuple(p / total for p in parts)

    @property
    def c_values(self) -> tuple:
        """"1e-4,1e-3" -> (0.0001, 0.001)."""
        try:
            values = tuple(float(c) for c in self.c_grid.split(","))
        except ValueError:
            values = ()
        if not values or not all(math.isfinite(c) and c > 0 for c in values):
            raise UserError(f"C_GRID={self.c_grid!r} is not a list of positive numbers: use e.g. "
                            "C_GRID=1e-3,1e-2,1e-1")
        return values

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _check_range(variable, value, low, high, meaning):
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UserError(f"{variable}={value!r} is out of range: use a whole number from {low} to "
                        f"{high} ({meaning})")


def _check_rate(variable, value, example):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not (math.isfinite(value) and 0 < value <= 1):
        raise UserError(f"{variable}={value!r} is not a learning rate: use a small positive "
                        f"number {example}")


def _check_fraction(variable, value, low, high):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not (math.isfinite(value) and low <= value <= high):
        raise UserError(f"{variable}={value!r} is out of range: use a number from {low} to {high}")


def _check_choice(variable, value, choices):
    if value not in choices:
        raise UserError(f"{variable}={value!r} is not one of {', '.join(choices)}")


def _check_memory(size, batch):
    """Refuse SIZE x BATCH_SIZE whose forward pass cannot fit in half of this machine's memory."""
    per_image = size * size * ACTIVATION_CHANNELS * 4  # float32
    needed = batch * per_image
    try:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * MEMORY_SHARE
    except (ValueError, OSError, AttributeError):  # not every OS reports its memory
        return
    if needed > available:
        fits = max(1, int(available // per_image))
        raise UserError(f"SIZE={size} with BATCH_SIZE={batch} needs about "
                        f"{needed / 2**30:.1f} GB for the backbone's activations, more than half "
                        "of this machine's memory: use "
                        f"BATCH_SIZE={fits} or less, or a smaller SIZE")


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
MAKE_VARIABLES = {name: f for name, f in FIELDS.items() if f.metadata["make"]}
RECORDED = tuple(name for name, f in FIELDS.items() if f.metadata.get("recorded"))


def help_text(f):
    """A setting's help, with its default when it has one (a flag's as 0 or 1)."""
    default = f.metadata["default"]
    default = int(default) if isinstance(default, bool) else default
    text = f.metadata["help"] + (f" (default {default})" if default not in ("", ()) else "")
    return text + ("; after extract, as the cache recorded it" if f.metadata.get("recorded")
                   else "")


def describe():
    """The settings as `make help` lists them: VARIABLE and help."""
    return "\n".join(f"  {name.upper():<18} {help_text(f)}" for name, f in MAKE_VARIABLES.items())


def unknown_variables(names):
    """The line that refuses Make variables that are no setting (`names`, as typed on the make
    command line), suggesting the nearest setting of each."""
    parts = []
    for name in names:
        nearest = difflib.get_close_matches(name.upper(), [v.upper() for v in MAKE_VARIABLES], 1,
                                            0.6)
        parts.append(f"{name}" + (f" (did you mean {nearest[0]}?)" if nearest else ""))
    return (f"unknown variable {', '.join(parts)}: not a setting, so nothing was run; "
            "`make help` lists the settings")


if __name__ == "__main__":  # make runs this with any Python 3: it needs no package
    if sys.argv[1:2] == ["--unknown"]:  # the Makefile's check of its command line
        print(unknown_variables(sys.argv[2:]))
    else:  # make help
        print(describe())
