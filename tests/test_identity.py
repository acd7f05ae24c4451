"""FeatureIdentity: existing caches keep their identity_id byte for byte, and old keys are read."""
import dataclasses

import numpy as np
import pytest

from pipeline.config import UserError
from pipeline.model import backbone
from pipeline.model.backbone import RANDOM_FINGERPRINT, FeatureIdentity, Weights

RANDOM = Weights("none", "", RANDOM_FINGERPRINT)
FILE = Weights("imagenet", "/x", "a" * 64)


def _without_precision(identity):
    return {k: v for k, v in identity.items() if k != "precision"}


# The expected ids were computed with the code before FeatureIdentity existed (the dict of
# backbone.feature_identity / cut_identity hashed by backbone.identity_id): they name the folders
# of caches on disk, so they must never change.
PINNED = [
    (backbone.feature_identity(RANDOM, 224), "b301dc6ac0b51e12"),
    (backbone.feature_identity(FILE, 224), "5d0294d1faf3a774"),
    (backbone.feature_identity(FILE, 160, "mixed_float16"), "b7f8e8b2175521b4"),
    (backbone.feature_identity(RANDOM, 96, "float32", "float16"), "545f86ce9cc7e18a"),
    (backbone.feature_identity(FILE, 224, "mixed_bfloat16", "float16"), "1e345dad5184f078"),
    ({**backbone.feature_identity(FILE, 224), "storage": "float16", "layer": "block4_pool"},
     "029cda1331fd63ef"),  # a cut kept in float16
    ({**backbone.feature_identity(FILE, 224), "layer": "block4_pool"}, "e004d5231bff81ff"),
    # made before PRECISION: no "precision" key
    (_without_precision(backbone.feature_identity(RANDOM, 224)), "48ab2319b77b96ae"),
]


@pytest.mark.parametrize("raw, expected", PINNED)
def test_identity_id_is_pinned(raw, expected):
    identity = FeatureIdentity.read(raw)
    assert identity.as_dict() == raw
    assert identity.id == expected == backbone.identity_id(raw)


def test_made_and_cut_identities_match_the_records():
    made = backbone.identity_of(FILE, 224, "float32", "float16")
    assert made.as_dict() == backbone.feature_identity(FILE, 224, "float32", "float16")
    assert made.id == backbone.identity_id(backbone.feature_identity(FILE, 224, "float32",
                                                                     "float16"))
    cut = made.cut("block4_pool", "float16")
    assert cut.id == "029cda1331fd63ef"
    assert made.cut("block4_pool", "float32").id == "e004d5231bff81ff"
    assert cut.as_dict() == PINNED[5][0]


def test_defaults_dtype_and_shape():
    old = FeatureIdentity.read(_without_precision(backbone.feature_identity(RANDOM, 224)))
    assert (old.precision, old.storage, old.dtype) == ("float32", "float32", np.float32)
    assert old.feature_shape == (7, 7, 512)
    half = FeatureIdentity.read(backbone.feature_identity(RANDOM, 96, "float32", "float16"))
    assert half.dtype == np.float16 and half.feature_shape == (3, 3, 512)
    assert half.cut("block4_pool", "float32").feature_shape == (6, 6, 512)
    with pytest.raises(dataclasses.FrozenInstanceError):
        half.image_size = 224  # frozen


@pytest.mark.parametrize("change", [
    {"image_size": 1500}, {"image_size": "224"}, {"image_size": True}, {"storage": "int8"},
    {"storage": "float32"}, {"precision": 16}, {"layer": "block9_pool"}, {"extra": 1},
    {"weights": None}])
def test_read_refuses_what_no_version_wrote(change):
    with pytest.raises(UserError, match="not a feature identity"):
        FeatureIdentity.read({**backbone.feature_identity(FILE, 224), **change})


def test_read_refuses_a_missing_key_or_no_dict():
    raw = backbone.feature_identity(FILE, 224)
    del raw["weights"]
    for bad in (raw, ["not", "a", "dict"], None):
        with pytest.raises(UserError, match="not a feature identity"):
            FeatureIdentity.read(bad)


@pytest.mark.parametrize("recorded, ok", [
    (PINNED[5][0], True),                                          # the features' own cut
    ({**PINNED[5][0], "weights": "b" * 64}, False),                # another backbone's
    ({**PINNED[5][0], "layer": "block3_pool"}, False),             # another layer
    ({**PINNED[5][0], "image_size": "224"}, False)])               # not an identity at all
def test_fine_tuning_uses_only_a_cut_of_the_features_own_backbone(recorded, ok):
    from types import SimpleNamespace

    from pipeline import finetune
    config = SimpleNamespace(finetune_from="cache", unfreeze="block5", finetune_augment=0)
    store = SimpleNamespace(cut={"layer": "block4_pool", "identity": recorded}, path="x.h5",
                            feature_identity=backbone.identity_of(FILE, 224))
    if ok:
        assert finetune.training_source(config, store) == "cache"
    else:
        with pytest.raises(UserError, match="another backbone"):
            finetune.training_source(config, store)
