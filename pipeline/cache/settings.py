"""The settings a feature cache remembers, and the start every stage shares.

extract records in features.h5 (attribute `settings`) the settings that define the dataset and
its rows: config.RECORDED (DATA, LABELS, SPLIT, SIZE, WEIGHTS, AUGMENT, ...). Every stage starts
with `run`: it holds the stage's lock, reads that record and `resolve`s the config against it,
then runs the stage on the resolved config, so that the stage, and every record it writes, uses
the dataset's own settings:

    not told                    -> the value the cache recorded (extract: the same; no cache:
                                   the default written in config.py)
    told the recorded value     -> that value
    told another value          -> refused in one line naming both values and the way on
                                   (extract: taken, as it is what makes the cache); taken
                                   for a setting that is not binding (SEED, UNFREEZE,
                                   FINETUNE_FROM, CUT_STORAGE: what a stage trains, or
                                   what extract adds, never which rows the cache holds)

A DATA that holds the cached images under another path (the folder moved, or a copy) is the same
dataset: the stage reads it, and the images' contents are checked where they are read.
The record is read from an untrusted file: a value of the wrong type is refused, not used.
"""
import os
import shlex
from dataclasses import dataclass

from ..config import FIELDS, RECORDED, UserError
from ..fs import lock
from .layout import DAMAGE, MASTER, no_cache, open_master
from .master import decode_attr

WEIGHTS_KEYWORDS = ("imagenet", "none", "auto")
PATHS_SEEN = 100  # cached paths read to recognise a DATA that moved
KIND = {int: "a whole number", str: "text"}  # the types of the recorded settings


@dataclass(frozen=True)
class Record:
    """What features/<NAME>/features.h5 recorded: `values` (setting -> value), `where` (the
    cache's folder, for messages), `paths` (a few cached image paths, relative to DATA) and
    `problem` (why the record cannot be used; "" when it can)."""
    values: dict
    where: str
    paths: tuple = ()
    problem: str = ""

    def holds_images_of(self, folder):
        return any(os.path.isfile(os.path.join(folder, p)) for p in self.paths)


def record_of(config) -> dict:
    """The `settings` attribute extract writes: every recorded setting of a resolved config."""
    return {name: normalized(name, getattr(config, name)) for name in RECORDED}


def normalized(name, value):
    """A setting's value as recorded and compared: DATA and a WEIGHTS file absolute, so that a
    cache records what it read whatever the working directory was. (LABELS stays as given: a
    relative one is looked for inside DATA first, data.labels.resolve_labels_path.)"""
    is_path = name == "data" or (name == "weights" and value not in WEIGHTS_KEYWORDS)
    if is_path and isinstance(value, str) and value:
        return os.path.abspath(value)
    return value


def read(features_dir):
    """The Record of features_dir's features.h5; None where there is none or it is unreadable
    (the stage then refuses the cache itself, or extract makes a new one)."""
    path = os.path.join(features_dir, MASTER)
    if not os.path.isfile(path):
        return None
    try:
        with open_master(path) as f:
            attrs = {key: decode_attr(f.attrs[key]) for key in
                     ("settings", "config", "weights_spec", "data_root", "augment")
                     if key in f.attrs}
            paths = tuple(f["path"].asstr()[:PATHS_SEEN]) if "path" in f else ()
    except DAMAGE:
        return None
    return _checked(_values(attrs), features_dir, paths)


def _values(attrs):
    """The recorded settings; for a cache made before caches recorded them (or by hand), what
    its other attributes say: the views it holds, the folder and weights it read, its config."""
    def mapping(value):
        return value if isinstance(value, dict) else {}
    views = mapping(attrs.get("augment")).get("views", 0)
    known = {**mapping(attrs.get("config")), "augment": views,
             "weights": attrs.get("weights_spec"), "data": attrs.get("data_root")}
    known = {name: value for name, value in known.items() if value not in (None, "")}
    recorded = {k: v for k, v in mapping(attrs.get("settings")).items() if v is not None}
    return {**known, **recorded}


def _checked(values, where, paths):
    kept = {}
    for name in RECORDED:
        value = values.get(name)
        if value is None:
            continue
        wanted = FIELDS[name].type
        if isinstance(value, bool) or not isinstance(value, wanted):
            return Record({}, where, paths, problem=f"it records {name.upper()}={value!r}, "
                                                    f"not {KIND[wanted]}")
        kept[name] = value
    return Record(kept, where, paths)


def resolve(config, record, stage):
    """`config` with every recorded setting filled in (module docstring); `record` is what
    `read` returned for its cache, `stage` the stage about to run (extract may change them)."""
    if record is not None and record.problem and stage != "extract":
        raise UserError(f"{record.where}/{MASTER} cannot be used ({record.problem}): run "
                        f"`make extract NAME={_quoted(config.dataset_name)}` to rebuild it")
    recorded = record.values if record is not None and not record.problem else {}
    values = {}
    for name in RECORDED:
        told, kept = getattr(config, name), recorded.get(name)
        if told is None:
            values[name] = kept if kept is not None else FIELDS[name].metadata["default"]
        elif (stage == "extract" or kept is None or not FIELDS[name].metadata["binding"]
              or _same(name, told, kept, record)):
            values[name] = normalized(name, told)
        else:
            raise UserError(refusal(config, name, told, kept, record.where))
    return config.replace(**values)


def _same(name, told, kept, record):
    if name == "split":
        return _fractions(told) == _fractions(kept)
    if name == "data" and record.holds_images_of(told):
        return True  # the same images under another path: moved, or a copy
    return normalized(name, told) == normalized(name, kept)


def _fractions(split):
    try:
        parts = [float(p) for p in str(split).split("/")]
        return tuple(round(p / sum(parts), 9) for p in parts)
    except (ValueError, ZeroDivisionError):
        return split


def refusal(config, name, told, kept, where):
    """The line that refuses `told` for a setting the cache in `where` recorded as `kept`."""
    variable, dataset = name.upper(), _quoted(config.dataset_name)
    was = f"with {variable}={_quoted(kept)}" if kept != "" else f"without {variable}"
    return (f"{variable}={_quoted(told)} but {where} was extracted {was}: run `make extract "
            f"NAME={dataset} {variable}={_quoted(told)}` first, or leave {variable} out")


def _quoted(value):
    return shlex.quote(str(value))


def run(config, stage, body, folder, holder=None):
    """body(resolved config) for `stage`, holding `folder`'s lock as `holder` (default: the
    stage; folder None: no lock). The record is read under the lock, so no extract rewrites it
    between the reading and the stage."""
    if folder is None:
        return body(resolve(config, read(config.features_dir), stage))
    if stage != "extract" and not os.path.exists(os.path.join(config.features_dir, MASTER)):
        raise no_cache(config.features_dir)  # before the lock makes models/<NAME>
    with lock.exclusive(folder, holder or stage):
        return body(resolve(config, read(config.features_dir), stage))
