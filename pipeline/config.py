"""Every setting of the pipeline, with its default, in one place.

The Makefile's variables (DATA, NAME, WEIGHTS, SIZE, ...) map one-to-one onto the fields below
through the CLI in `__main__.py`; a variable left empty keeps the default written here.
"""
import dataclasses
import json
import os
from dataclasses import dataclass, field


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
    model: str = "auto"              # MODEL: auto | finetuned | head | logreg
    # --- export ----------------------------------------------------------------------------------
    out: str = ""                    # OUT: the file `make export` writes (never overwritten)
    # --- batch -----------------------------------------------------------------------------------
    datasets: tuple = ()             # DATASETS: dataset folders for `make batch`
    batch_file: str = ""             # BATCH_FILE: one "folder [name]" per line
    finetune: bool = True            # FINETUNE=0 skips fine-tuning in `make batch`
    force: bool = False              # FORCE=1 reruns unchanged datasets in `make batch`
    # --- where outputs go ------------------------------------------------------------------------
    features_root: str = "features"
    models_root: str = "models"
    extras: dict = field(default_factory=dict, compare=False)  # stage-specific knobs (bench, tests)

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
        if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0 or parts[0] == 0:
            raise UserError(f"SPLIT={self.split!r} is not train/validation/test percentages; "
                            "use e.g. SPLIT=80/10/10")
        total = sum(parts)
        return tuple(p / total for p in parts)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "extras"}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


FIELDS = {f.name: f for f in dataclasses.fields(Config) if f.name != "extras"}
