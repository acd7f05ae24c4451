"""What makes a cached row what it is: the identity of a cache's features, or of the
activations of a cut of the backbone, as caches and models record it.

A cache reuses a row only when every field of its identity is equal: the backbone, the weights'
fingerprint, the image size, the preprocessing, the precision it was computed in, the storage it
is kept in, and the layer cached (None: the base's output, the features). `identity_id` names the
folder of a cache's segments after a hash of that record, so rows of other identities never mix.
The backbone is named as data/backbones.py's table names it; this module builds no model: the
cache reads identities with it, and model/backbone.py makes them.
"""
import hashlib
import json
from dataclasses import dataclass, replace

import numpy as np

from ..config import MAX_SIZE, MIN_SIZE, UserError
from ..data import backbones

STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}  # STORAGE: how features are kept


def identity_problem(identity):
    """None for an identity whose image_size is a SIZE (config.MIN_SIZE..MAX_SIZE), else what
    is wrong: 1500, read back from a cache, ended in a Keras traceback."""
    size = identity.get("image_size") if isinstance(identity, dict) else None
    if isinstance(size, int) and not isinstance(size, bool) and MIN_SIZE <= size <= MAX_SIZE:
        return None
    shown = repr(size if isinstance(identity, dict) else identity)[:40]
    return f"its identity's image_size is {shown}, not an integer from {MIN_SIZE} to {MAX_SIZE}"


@dataclass(frozen=True)
class FeatureIdentity:
    """Everything that changes the numbers a cache keeps: the features (layer None) or the
    activations of the cut `layer`. `read` is the one place a recorded identity's keys are read;
    `as_dict` gives back exactly that record, so `id` is its `identity_id` byte for byte."""
    backbone: str
    weights: str            # the weights' fingerprint
    image_size: int
    preprocess: str
    precision: str = "float32"
    storage: str = "float32"
    layer: str | None = None      # a cut's layer; None for the base's output, the features
    precision_recorded: bool = True  # False: made before PRECISION (float32), no "precision" key

    @classmethod
    def read(cls, raw):
        """The identity recorded as `raw` (a cache's attribute, a model's JSON). Missing storage
        and precision mean float32 (caches made before STORAGE and PRECISION). Refuses anything
        no version of this pipeline wrote, so that `as_dict() == raw`."""
        problem = identity_problem(raw)
        if problem is None:
            strings = ("backbone", "weights", "preprocess", "precision", "storage")
            bad = [k for k in strings if k in raw and not isinstance(raw[k], str)]
            bad += sorted(set(raw) - {*strings, "image_size", "layer"})
            missing = sorted({"backbone", "weights", "preprocess"} - set(raw))
            if missing or bad:
                problem = f"its identity has {'no ' + missing[0] if missing else repr(bad[0])}"
            elif raw.get("storage", "float32") not in STORAGE_DTYPES:
                problem = f"its identity's storage is {raw['storage']!r:.40}"
            elif raw.get("storage") == "float32":
                problem = "its identity records storage float32, which none ever did"
            elif "layer" in raw and not _is_stage_output(raw["backbone"], raw["layer"]):
                problem = f"its identity's layer is {raw['layer']!r:.40}"
        if problem:
            raise UserError(f"not a feature identity of this pipeline: {problem}")
        return cls(raw["backbone"], raw["weights"], raw["image_size"], raw["preprocess"],
                   raw.get("precision", "float32"), raw.get("storage", "float32"),
                   raw.get("layer"), "precision" in raw)

    def as_dict(self):
        """The identity as caches and models record it (JSON): storage only when not float32,
        layer only for a cut, precision unless it was made before PRECISION."""
        identity = {"backbone": self.backbone, "weights": self.weights,
                    "image_size": self.image_size, "preprocess": self.preprocess}
        if self.precision_recorded:
            identity["precision"] = self.precision
        if self.storage != "float32":
            identity["storage"] = self.storage
        if self.layer is not None:
            identity["layer"] = self.layer
        return identity

    @property
    def id(self):
        """The name of the folder its segments are kept in (`identity_id`)."""
        return identity_id(self.as_dict())

    @property
    def dtype(self):
        """The dtype the cache stores its rows in (they are always read back as float32)."""
        return STORAGE_DTYPES[self.storage]

    @property
    def entry(self):
        """Its backbone's entry in data/backbones.py's table; one line for one we do not know."""
        entry = backbones.of_identity(self.backbone)
        if entry is None:
            raise UserError(f"features made by {self.backbone!r:.60}, a backbone this pipeline "
                            f"does not know (BACKBONE= {', '.join(backbones.TABLE)})")
        return entry

    @property
    def output_layer(self):
        """The layer whose output the rows are: a cut or FEATURE_LAYER's stage, else the top."""
        return self.layer or self.entry.top.output

    @property
    def feature_shape(self):
        """The shape of one image's row: the features, or the cut layer's activations."""
        return self.entry.layer_shape(self.output_layer, self.image_size)

    def cut(self, layer, storage):
        """The identity of the activations of `layer` by the same backbone, kept in `storage`."""
        return replace(self, layer=layer, storage=storage)


def identity_id(identity):
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _is_stage_output(backbone_id, layer):
    """A recorded layer must be a stage output of its backbone (any string of one we do not
    know: such an identity is refused where its backbone is needed, FeatureIdentity.entry)."""
    entry = backbones.of_identity(backbone_id)
    if entry is None:
        return isinstance(layer, str)
    return isinstance(layer, str) and entry.layer(layer) is not None
