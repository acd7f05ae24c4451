"""Where extract's compute runs: the one path from model input to cached rows, here or on Ray.

    featurize    decode, augment and run the backbone; rows for every cached layer (ENGINE=local)
    ray_engine   the same featurizer in Ray Data actors on a cluster (ENGINE=ray, optional)

Imports pipeline.config, fs, data, cache and model; never analysis, reporting or a stage.
"""
