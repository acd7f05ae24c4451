"""A tiny trained run shared by the tests of evaluate, predict and report: 2 classes x 10 striped
32-pixel images, WEIGHTS=none, extract -> train-head -> finetune, in seconds on a CPU."""
import os

from helpers import built_once, copy_folders, make_image_folder, tiny_config

from pipeline import extract, finetune, train_head


def run_config(root, **changes):
    """The trained run's Config under root (data/, features/, models/): the tests' tiny settings
    (`helpers.tiny_config`), with a name, a split that keeps both classes in each, 2 epochs."""
    settings = dict(name="tiny", split="40/30/30", epochs=2, seed=0)
    return tiny_config(root, os.path.join(root, "data"), **{**settings, **changes})


def make_trained_run(root, per_class=10, **changes):
    """The Config of a finished extract -> train-head -> finetune run under `root` (with these
    20 images the splits hold 5 train, 8 validation and 7 test images, both classes in each)."""
    config = run_config(str(root), **changes)
    make_image_folder(config.data, per_class=per_class)
    extract.run(config)
    train_head.run(config)
    finetune.run(config)
    return config


_SHARED = {}


def trained_run_copy(tmp_path_factory, root):
    """The Config of a copy under root of one trained run, made once for the whole pytest run."""
    pristine = built_once(tmp_path_factory, "trained_run", make_trained_run)
    copy_folders(pristine, root)
    return run_config(str(root))


def shared_trained_run(tmp_path_factory):
    """One trained run for the whole test session, shared by the evaluate, predict and report
    tests (a copy per xdist worker). Treat it as read-only: a test that changes models or
    features works on a copy."""
    if "config" not in _SHARED:
        _SHARED["config"] = trained_run_copy(tmp_path_factory, tmp_path_factory.mktemp("trained"))
    return _SHARED["config"]
