"""A dataset as files and labels, and the one way an image file becomes model input.

    datasets   walk DATA, assign splits by content hash, read labels (with labels)
    labels     LABELS=<csv>: the label columns, checked
    images     load_image, the one image loader, and the tf.data input pipeline
    augment    the augmentation (RandomAffine) and the keys of augmented views
    demo       the embedded two-class demo images (`make demo-data`)

Imports pipeline.config and pipeline.fs; never the cache, a model or a stage.
"""
