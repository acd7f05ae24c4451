"""The networks: the frozen backbone, the heads on top of it, and how models are trained and read.

    runtime    the Keras backend, a quiet start, the fastest safe precision
    backbone   the frozen convolutional base, its weights and its feature identity
    heads      the dense head and the logistic-regression baseline
    registry   the one table of model kinds: files, loaders and checks of what is read back
    resume     fine-tuning's backups, to continue after a kill
    logs       TensorBoard logs through Keras's callback

Imports pipeline.config, fs, data and cache; never analysis, engines, reporting or a stage.
"""
