"""Measures on the cached features that audit and predict share.

    outliers   distance to the nearest training class centroid, and its threshold

Imports pipeline.config, fs, data, cache and model; never engines, reporting or a stage.
"""
