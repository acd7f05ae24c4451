"""TensorBoard logs of every training run, through Keras's own callback:

    models/<NAME>/logs/head/       the dense head (train-head)
    models/<NAME>/logs/finetune/   fine-tuning (continued across resumes)

    tensorboard --logdir models/<NAME>/logs

Keras writes them with TensorFlow's summary writer (tf.summary, implemented by the tensorboard
package), whatever the backend: without both packages there is nothing to write them with, and
under JAX or PyTorch writing them would import TensorFlow (seconds, and GPU memory), which such
a run never does. There, training goes on without them after a one-line notice.
"""
import importlib.util
import os
import shutil

import keras

from ..fs import artifacts, files

WRITER = ("tensorflow", "tensorboard")  # what keras.callbacks.TensorBoard writes through


def tensorboard(config, run, fresh=True):
    """The TensorBoard callback writing models/<NAME>/logs/<run>/, or None (with a notice) where
    no summary writer is installed. fresh: start the run's logs over (a resumed run appends)."""
    folder = os.path.join(artifacts.path(config, artifacts.LOGS), run)
    if keras.backend.backend() != "tensorflow":
        print(f"{run}: no TensorBoard logs under BACKEND={keras.backend.backend()}: Keras writes "
              "them through TensorFlow, which a JAX or PyTorch run does not import")
        return None
    missing = [p for p in WRITER if importlib.util.find_spec(p) is None]
    if missing:
        print(f"{run}: no TensorBoard logs in {folder}: Keras writes them through TensorFlow's "
              f"summary writer; `pip install {' '.join(missing)}` to have them")
        return None
    # a link planted at logs/ or inside it would have the events written, and rmtree delete,
    # elsewhere: removed, never followed, as for finetune_backup/
    files.no_link_folder(os.path.dirname(folder))
    if fresh:
        shutil.rmtree(folder, ignore_errors=True)
    return keras.callbacks.TensorBoard(log_dir=folder)
