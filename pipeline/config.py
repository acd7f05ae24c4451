"""Every setting of the pipeline, with its default, in one place.

The Makefile's variables (DATA, NAME, WEIGHTS, SIZE, ...) map one-to-one onto the fields below
through the CLI in `__main__.py`; a variable left empty keeps the default written here.
"""
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field

MIN_SIZE, MAX_SIZE = 32, 1024  # VGG16 needs 32 px for one 1x1 feature map; it was trained at 224
MAX_BATCH = 1024
# SIZE x SIZE x BATCH must leave room: VGG16's first block holds the input and two 64-channel
# float32 maps per image at once, the peak of a forward pass. Past this share of the machine's
# memory, a run would end in the kernel's out-of-memory killer, with no message.
MEMORY_SHARE = 0.5
# A dataset name becomes one folder under features/ and models/, typed in shells and Makefiles:
# letters and digits of any script, then also space and _ . , - + = @ ~ ( ) [ ] { }. That rules
# out separators, "." and "..", hidden folders, glob stars, quotes and control characters.
NAME_PATTERN = re.compile(r"\w[\w .,+=@~()\[\]{}-]{0,99}")


class UserError(Exception):
    """A problem the user can fix. The CLI prints it as one line and exits non-zero."""


@dataclass(frozen=True)
class Config:
    # --- dataset -----------------------------------------------------------------------------
    data: str = "data/demo"          # DATA: DATA/<class>/* or DATA/{train,validation,test}/<class>/*
    name: str = ""                   # NAME: subfolder of features/ and models/; default basename(DATA)
    split: str = "80/10/10"          # SPLIT: train/validation/test percentages for layout (a)
    labels: str = ""                 # LABELS: optional CSV of filename,label for a flat image folder
    label_columns: str = "filename,label"  # LABEL_COLUMNS: the CSV's file-name and label columns
    # --- backbone and cache identity -----------------------------------------------------------
    weights: str = ""                # WEIGHTS: imagenet | none | auto (demo only) | <file.h5>;
                                     # empty: imagenet for extract, the cache's weights afterwards
    size: int = 150                  # SIZE: images are resized to SIZE x SIZE
    batch: int = 32                  # BATCH: images per forward pass
    precision: str = "auto"          # PRECISION: auto (mixed_float16 on a GPU, else float32) |
                                     # float32 | mixed_float16 | mixed_bfloat16; part of the identity
    storage: str = "float32"         # STORAGE: float32 | float16 (half the disk and read I/O; the
                                     # features are rounded to ~3 digits); part of the identity
    # --- stage two: the head on cached features -------------------------------------------------
    head: str = "both"               # HEAD: dense | logreg | both
    epochs: int = 30                 # EPOCHS: head epochs (early stopping usually ends sooner)
    seed: int = 0                    # SEED: one seed for splits of work, initialisation and shuffles
    # --- stage three: fine-tuning ----------------------------------------------------------------
    unfreeze: str = "block5"         # UNFREEZE: a block name (block5) or a count of top conv layers
    finetune_epochs: int = 10        # EPOCHS for `make finetune`
    lr: float = 1e-5                 # LR: low, so the pretrained filters are adjusted, not wiped out
    fresh: bool = False              # FRESH=1 ignores an earlier fine-tuning checkpoint
    # --- prediction ------------------------------------------------------------------------------
    images: str = ""                 # IMAGES: a file or folder to predict
    model: str = "auto"              # MODEL: auto | logreg | dense | finetuned
    # --- batch -----------------------------------------------------------------------------------
    datasets: tuple = ()             # DATASETS: dataset folders for `make batch`
    batch_file: str = ""             # BATCH_FILE: one "folder [name]" per line
    finetune: bool = True            # FINETUNE=0 skips fine-tuning in `make batch`
    force: bool = False              # FORCE=1 reruns unchanged datasets in `make batch`
    # --- where outputs go ------------------------------------------------------------------------
    features_root: str = "features"
    models_root: str = "models"
    extras: dict = field(default_factory=dict, compare=False)  # stage-specific knobs (bench, tests)

    def __post_init__(self):
        """Refuse a bad setting here, with one line naming the fix, before any work starts:
        a deep traceback or a run that trains on nonsense (LR=-1) helps nobody."""
        self._check_name()
        _check_range("SIZE", self.size, MIN_SIZE, MAX_SIZE, "the images' side in pixels")
        _check_range("BATCH", self.batch, 1, MAX_BATCH, "images per step")
        _check_range("EPOCHS", self.epochs, 1, 100_000, "head epochs")
        _check_range("FINETUNE_EPOCHS", self.finetune_epochs, 1, 100_000, "fine-tuning epochs")
        _check_range("SEED", self.seed, 0, 2**32 - 1, "a non-negative integer")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and 0 < self.lr <= 1):
            raise UserError(f"LR={self.lr!r} is not a learning rate: use a small positive number "
                            "such as LR=1e-5")
        self.split_fractions  # noqa: B018 (parses SPLIT, raising on a bad one)
        _check_choice("HEAD", self.head, ("dense", "logreg", "both"))
        from .registry import NAMES  # here: the registry's module imports this one
        _check_choice("MODEL", self.model, ("auto", *NAMES))
        _check_choice("PRECISION", self.precision,
                      ("auto", "float32", "mixed_float16", "mixed_bfloat16"))
        _check_choice("STORAGE", self.storage, ("float32", "float16"))
        _check_memory(self.size, self.batch)

    def _check_name(self):
        name = self.dataset_name
        if not NAME_PATTERN.fullmatch(name):
            given = f"NAME={self.name!r}" if self.name else f"DATA={self.data!r} (its folder name)"
            raise UserError(f"{given} is not a dataset name: it names one folder in features/ and "
                            "models/: pass NAME=<letters, digits, - _ . and no '/'>")

    @property
    def dataset_name(self) -> str:
        return self.name or os.path.basename(os.path.normpath(self.data))

    @property
    def features_dir(self) -> str:
        return os.path.join(self.features_root, self.dataset_name)

    @property
    def models_dir(self) -> str:
        return os.path.join(self.models_root, self.dataset_name)

    @property
    def split_fractions(self) -> tuple:
        """"80/10/10" -> (0.8, 0.1, 0.1)."""
        try:
            parts = [float(p) for p in self.split.split("/")]
        except ValueError:
            parts = []
        if (len(parts) != 3 or not all(map(math.isfinite, parts)) or min(parts) < 0
                or parts[0] == 0 or parts[1] == 0):
            raise UserError(f"SPLIT={self.split!r} is not train/validation/test percentages with "
                            "a train and a validation share (validation picks the best epoch): "
                            "use e.g. SPLIT=80/10/10 or 80/20/0")
        total = sum(parts)
        return tuple(p / total for p in parts)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "extras"}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _check_range(variable, value, low, high, meaning):
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UserError(f"{variable}={value!r} is out of range: use a whole number from {low} to "
                        f"{high} ({meaning})")


def _check_choice(variable, value, choices):
    if value not in choices:
        raise UserError(f"{variable}={value!r} is not one of {', '.join(choices)}")


def _check_memory(size, batch):
    """Refuse SIZE x BATCH whose forward pass cannot fit in half of this machine's memory."""
    needed = batch * size * size * (3 + 64 + 64) * 4  # input + block1's two conv outputs, float32
    try:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * MEMORY_SHARE
    except (ValueError, OSError, AttributeError):  # not every OS reports its memory
        return
    if needed > available:
        fits = max(1, int(available // (size * size * 131 * 4)))
        raise UserError(f"SIZE={size} with BATCH={batch} needs about {needed / 2**30:.1f} GB for "
                        f"VGG16's activations, more than half of this machine's memory: use "
                        f"BATCH={fits} or less, or a smaller SIZE")


FIELDS = {f.name: f for f in dataclasses.fields(Config) if f.name != "extras"}
