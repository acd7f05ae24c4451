"""Export the feature cache as one HDF5 file that stands alone.

    python -m pipeline export --name NAME --out FILE.h5

features/<NAME>/features.h5 reads its features from the segment files beside it (a virtual
dataset), so a copy of it alone reads as NaN. The export holds the same index datasets and
attributes with `features` as a real dataset, checksummed, written atomically: copy it anywhere.
The HDF5 copying is cache.FeatureStore.write_standalone; what an export leaves out is decided
here (LEFT_OUT).
"""
import os
import time
from dataclasses import dataclass

from . import cache
from .cache import settings
from .config import Config, UserError
from .fs import files

# the cache's plumbing (which segments the master reads), the training views and fine-tuning's
# activations: an exported file holds the index and the features
LEFT_OUT = ("segments", *cache.VIEW_DATASETS, *cache.CUT_DATASETS)


@dataclass
class ExportResult:
    path: str
    rows: int
    bytes: int
    seconds: float


def run(config: Config) -> ExportResult:
    start = time.perf_counter()
    out = _checked_out(config)
    if not os.path.exists(os.path.join(config.features_dir, cache.MASTER)):
        raise UserError(f"no feature cache at {os.path.join(config.features_dir, cache.MASTER)}: "
                        "run `make extract DATA=<folder>` first")
    # as extract's lock: an extract replacing segments under a long export would end it
    rows = settings.run(config, "export", lambda resolved: _export_locked(resolved, out),
                        config.features_dir, holder="extract")
    result = ExportResult(out, rows, os.path.getsize(out), time.perf_counter() - start)
    print(f"export {config.dataset_name}: {rows} rows -> {out} ({result.bytes / 1e6:.1f} MB), "
          f"{result.seconds:.1f} s")
    return result


def _export_locked(config, out):
    # a killed export's temporary beside OUT; only OUT's own: the folder is the user's
    files.remove_temporaries(os.path.dirname(os.path.abspath(out)), names={os.path.basename(out)})
    return export(config.features_dir, out)


def export(features_dir, out_path):
    """Write features/<NAME> as one self-contained HDF5 file at out_path (atomically), streamed
    a block of rows at a time. Returns the number of rows."""
    with cache.FeatureStore(features_dir) as store:  # refuses a missing or damaged cache
        files.atomic_write(out_path, lambda fileobj: store.write_standalone(fileobj, LEFT_OUT))
        return len(store)


def _checked_out(config):
    """OUT, refused when it would overwrite anything or land inside the pipeline's own folders."""
    out = config.out
    if not out:
        raise UserError("OUT is not set: use `make export NAME=<name> OUT=<file.h5>`")
    if os.path.lexists(out):
        raise UserError(f"OUT={out} exists already: choose another file name, or remove it first")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise UserError(f"OUT={out}: the folder {folder} does not exist; create it first")
    for root, variable in ((config.features_root, "features"), (config.models_root, "models")):
        root = os.path.realpath(root)
        if os.path.commonpath([os.path.realpath(folder), root]) == root:
            raise UserError(f"OUT={out} is inside {variable}/, which the pipeline manages: write "
                            "the export elsewhere, e.g. OUT=exports/<name>.h5")
    return out
