"""Issue 11, the cache layer: hostile and careless input. NAMEs that look like glob patterns.

Each test checks three things: files outside features/<NAME> are left alone, the outcome, and
the one line the user reads.
"""
import hashlib
import os

import numpy as np
import pytest

from pipeline import cache, extract
from tests.conftest import make_image_folder



def contents(top, leave_out=()):
    """{path: sha256 of the bytes} of every file under `top`, except under `leave_out`."""
    found = {}
    for folder, _, names in os.walk(top):
        for name in names:
            path = os.path.join(folder, name)
            if not any(path.startswith(os.path.join(x, "")) for x in leave_out):
                with open(path, "rb") as f:
                    found[path] = hashlib.sha256(f.read()).hexdigest()
    return found


def features_by_path(features_dir):
    with cache.FeatureStore(features_dir) as store:
        return dict(zip(store.paths, store.read(np.arange(len(store)))))


def assert_same_features(a, b):
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path])


def segment_files(features_dir):
    return sorted(os.path.join(folder, name)
                  for folder, _, names in os.walk(os.path.join(features_dir, "segments"))
                  for name in names if name.endswith(".h5"))


def one_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


# --------------------------------------------------------------------------------------------
# 1. NAME is a name, never a pattern
# --------------------------------------------------------------------------------------------

def test_a_name_with_brackets_reuses_its_cache(tmp_path, make_config, capsys):
    bracketed = make_config(make_image_folder(tmp_path / "set[1]"))  # NAME = set[1]
    other = make_config(make_image_folder(tmp_path / "other", seed=1))
    extract.run(bracketed)
    extract.run(other)
    segments = segment_files(bracketed.features_dir)
    outside = contents(tmp_path, [bracketed.features_dir])
    capsys.readouterr()

    again = extract.run(bracketed)

    assert contents(tmp_path, [bracketed.features_dir]) == outside
    assert (again.new, again.reused) == (0, 12)
    assert segment_files(bracketed.features_dir) == segments  # none piled up
    assert "12 rows, 0 new, 12 reused" in one_line(capsys.readouterr().out)


def test_a_name_of_glob_characters_leaves_other_datasets_alone(tmp_path, make_config, capsys):
    alpha = make_config(make_image_folder(tmp_path / "alpha"))
    beta = make_config(make_image_folder(tmp_path / "beta", seed=1))
    extract.run(alpha)
    extract.run(beta)
    starred = make_config(alpha.data, name="*")  # the same images as alpha, under NAME='*'
    outside = contents(tmp_path, [starred.features_dir])
    capsys.readouterr()

    result = extract.run(starred)

    assert contents(tmp_path, [starred.features_dir]) == outside  # alpha's and beta's segments
    assert (result.new, result.reused) == (12, 0)  # computed for '*', not taken from alpha
    assert_same_features(features_by_path(starred.features_dir),
                         features_by_path(alpha.features_dir))
    assert "12 rows, 12 new, 0 reused" in one_line(capsys.readouterr().out)


def test_only_our_own_temporary_files_are_cleaned_up(image_folder, make_config, capsys):
    config = make_config(image_folder)
    extract.run(config)
    folder = config.features_dir
    [segment] = segment_files(folder)
    ours = [os.path.join(folder, cache.MASTER + ".tmp"), segment + ".tmp"]
    theirs = [os.path.join(folder, "notes.tmp"), os.path.join(folder, "mine", "draft.h5.tmp"),
              os.path.join(image_folder, "horizontal", "upload.tmp")]
    for path in ours + theirs:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").close()
    outside = contents(os.path.dirname(folder), [folder])
    capsys.readouterr()

    again = extract.run(config)

    assert contents(os.path.dirname(folder), [folder]) == outside
    assert [os.path.exists(p) for p in ours + theirs] == [False] * 2 + [True] * 3
    assert again.new == 0
    assert "0 new, 12 reused" in one_line(capsys.readouterr().out)
