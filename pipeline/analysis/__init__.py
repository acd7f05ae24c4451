"""Measures on the cached features that audit and predict share, on arrays.

    near_duplicates   a descriptor a copy keeps, and the tiled pair search
    label_issues      confident learning on out-of-fold probabilities; identical files under
                      different labels
    outliers          the distance to the training data, and its threshold

Imports pipeline.config, fs, data, cache and model; never engines, reporting or a stage.
"""
