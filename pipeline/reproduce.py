"""The article's experiment: VGG16 transfer learning on the public cats-vs-dogs subset.

    python -m pipeline reproduce [--weights FILE] [--data AN_EXISTING_COPY]

1. download cats_and_dogs_filtered.zip (2000 training and 1000 validation images, the subset of
   the TensorFlow transfer-learning tutorial) into data/downloads/, resuming a broken download
   with an HTTP Range request, unpack it into data/cats_and_dogs_filtered and check the counts
   (the download and the unpacking are bounded: MAX_DOWNLOAD, MAX_UNPACKED, MAX_MEMBERS);
2. get the ImageNet weights (Keras's own download and cache);
3. extract -> train-head -> finetune -> evaluate -> report with the article's settings;
4. print our accuracies beside the article's.
The zip has no test folder, so half of its validation images (chosen by content hash) become our
test split: "validation" and "test" below are two disjoint halves of the article's validation set.
"""
import http.client
import os
import posixpath
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass

from tqdm import tqdm

from .cache import settings as recorded
from .config import Config, UserError, warn
from .data import backbones, datasets
from .fs import artifacts, files
from .model import backbone, registry

URL = "https://storage.googleapis.com/mledu-datasets/cats_and_dogs_filtered.zip"
DOWNLOADS = "data/downloads"
DATA_PARENT = "data"
FOLDER = "cats_and_dogs_filtered"
EXPECTED = {"train": {"cats": 1000, "dogs": 1000}, "validation": {"cats": 500, "dogs": 500}}
# The article's settings. Fine-tuning: 20 epochs of RMSprop at LR=1e-5 (the article ran longer;
# with a learning rate this low and early stopping restoring the best epoch, 20 is where it levels
# off). The pipeline's own default is Adam at 1e-4 (bench/QUALITY_NOTES.md, section e). The
# article's base, whatever BACKBONE says.
SETTINGS = dict(backbone="vgg16", size=150, batch_size=20, epochs=30, head="both",
                unfreeze="block5",
                finetune_optimizer="rmsprop", lr=1e-5, finetune_epochs=20)
ARTICLE = {"dense": 0.95, "finetuned": 0.97}   # "about 95%" and "about 97%" validation accuracy
RESULTS = "reproduce.json"
RETRIES = 5
TIMEOUT = 60          # seconds without a byte before a connection counts as broken
CHUNK = 1 << 16
# The archive is 65 MiB (68,606,236 bytes) and unpacks to about as much (JPEGs do not compress):
# anything far bigger is not that file, and must not fill the disk before we notice.
MAX_DOWNLOAD = 128 << 20   # bytes of the zip: twice the real one
MAX_UNPACKED = 256 << 20   # bytes its files unpack to, all together: a zip bomb stops here
MAX_MEMBERS = 10_000       # entries in the zip: the real one has 3,000 images and their folders


@dataclass
class ReproduceResult:
    data: str            # the verified dataset folder
    results: dict        # model -> {"validation", "test", "article"}
    path: str            # models/<NAME>/reproduce.json


def run(config: Config, *, url=URL, downloads=DOWNLOADS, data_parent=DATA_PARENT,
        expected=EXPECTED, retry_wait=2.0, settings=None) -> ReproduceResult:
    """The article's experiment. The keywords point it elsewhere (the tests' tiny archive on a
    local server): where to download from and to, the expected image counts, and `settings`
    that replace the article's SETTINGS."""
    if config.data is not None:  # DATA names a copy the user already has
        folder = config.data
    else:
        folder = os.path.join(data_parent, FOLDER)
        if not os.path.isdir(folder):
            zip_path = download(url, os.path.join(downloads, FOLDER + ".zip"), wait=retry_wait)
            unpack(zip_path, data_parent)
    verify(folder, expected)
    weights = config.weights or "imagenet"
    # step 2 before hours of work: offline, it fails right here
    backbone.resolve_weights(weights, backbones.get(SETTINGS["backbone"]))
    settings = config.replace(data=folder, name=config.name or FOLDER, weights=weights,
                              **{**(SETTINGS if settings is None else settings),
                                 "backbone": SETTINGS["backbone"]})
    from . import evaluate, extract, finetune, report, train_head  # the stages, in order
    for stage in (extract, train_head, finetune, evaluate, report):
        print(f"\n=== reproduce: {stage.__name__.rsplit('.', 1)[-1]} ===", flush=True)
        stage.run(settings)
    # the settings the stages used: what extract recorded where these left one untold
    return compare(recorded.resolve(settings, recorded.read(settings.features_dir), "report"))


# --------------------------------------------------------------------------------------------
# Download, unpack, verify
# --------------------------------------------------------------------------------------------

def download(url, dest, retries=RETRIES, timeout=TIMEOUT, wait=2.0):
    """Fetch `url` into `dest` through dest.part. A broken connection is resumed from the bytes
    already on disk with an HTTP Range request, in this run (up to `retries` times) or the next."""
    if os.path.exists(dest):
        return dest
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    part = dest + ".part"
    problem = ""
    for attempt in range(retries + 1):
        if attempt:
            print(f"download interrupted ({problem}); resuming, try {attempt} of {retries}",
                  flush=True)
            time.sleep(wait * attempt)
        try:
            if _fetch(url, part, timeout):
                os.replace(part, dest)
                return dest
            problem = "the connection closed before the end of the file"
        except urllib.error.HTTPError as error:
            if error.code != 416:
                raise UserError(f"downloading {url} failed: HTTP {error.code} "
                                f"{error.reason}") from None
            os.remove(part)  # 416: what we hold does not fit the file on the server; start over
            problem = "the partial file did not match the server's: starting over"
        except urllib.error.URLError as error:  # no connection at all: DNS, refused, unreachable
            problem = f"{type(error.reason).__name__}: {error.reason}"
            if not os.path.exists(part):
                break  # offline: retrying will not help
        except (http.client.HTTPException, OSError) as error:  # broken in the middle of the file
            if files.is_full(error):  # retrying cannot help; the partial file is resumed later
                words, fix = files.FULL[files.full_errno(error)]
                raise files.NoSpace(f"{words} downloading {url} into {part}: {fix}, then rerun "
                                    "`make reproduce`, which resumes the download") from None
            problem = f"{type(error).__name__}: {error}"
    raise UserError(f"could not download {url} ({problem or 'no network'}): `make reproduce` needs "
                    f"internet access; or download the file yourself to {dest} (a partial "
                    f"{os.path.basename(part)} is resumed by the next run)")


def _fetch(url, part, timeout):
    """One request: append to `part` from where it ends. True when the file is complete. More
    than MAX_DOWNLOAD bytes in all, announced or sent, is refused and `part` deleted."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        content_range = response.headers.get("Content-Range", "")
        if have and not (response.status == 206 and content_range.startswith(f"bytes {have}-")):
            have = 0  # the server sent the whole file: start from zero
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        if have > MAX_DOWNLOAD or (total is not None and total > MAX_DOWNLOAD):
            _too_big_download(url, part, total)  # refused before a byte is written
        with open(part, "ab" if have else "wb") as f, \
                tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=f"download {os.path.basename(url)}") as progress:
            done = have
            # never more than the cap plus one byte: a body without Content-Length has no end
            while chunk := response.read(min(CHUNK, MAX_DOWNLOAD + 1 - done)):
                done += len(chunk)
                if done > MAX_DOWNLOAD:
                    break
                f.write(chunk)
                progress.update(len(chunk))
    if done > MAX_DOWNLOAD:
        _too_big_download(url, part, None)
    return total is None or os.path.getsize(part) == total


def _too_big_download(url, part, total):
    _remove(part)
    size = f"announces {total:,} bytes" if total is not None else "sends more than that"
    raise UserError(f"{url} is not the expected archive: it {size}, over the "
                    f"{MAX_DOWNLOAD >> 20} MiB limit (MAX_DOWNLOAD in pipeline/reproduce.py) for "
                    "a 65 MiB file; nothing was kept: check the URL, or download the file "
                    "yourself and pass DATA=<its unpacked folder>")


class _TooBig(Exception):
    """The archive is over a limit: the reason, for the one line."""


def unpack(zip_path, parent):
    """Unpack into parent/ through a temporary folder, so a half-unpacked dataset never exists.
    Bounded: the members' count and declared sizes are checked first, the bytes really written
    while they are, against MAX_MEMBERS and MAX_UNPACKED. On any failure (a damaged or oversized
    archive, a full disk) the temporary folder is removed and one line says what to do."""
    tmp = os.path.join(parent, f".{FOLDER}.tmp")
    _remove(tmp)  # a leftover of a killed run
    try:
        if os.path.getsize(zip_path) > MAX_DOWNLOAD:  # a zip put there by hand, not downloaded
            raise _TooBig(f"is {os.path.getsize(zip_path):,} bytes, over the "
                          f"{MAX_DOWNLOAD >> 20} MiB limit (MAX_DOWNLOAD)")
        with zipfile.ZipFile(zip_path) as archive:
            members = archive.infolist()
            if len(members) > MAX_MEMBERS:
                raise _TooBig(f"has {len(members):,} entries, over the limit of "
                              f"{MAX_MEMBERS:,} (MAX_MEMBERS)")
            declared = sum(m.file_size for m in members)
            if declared > MAX_UNPACKED:
                raise _TooBig(f"unpacks to {declared:,} bytes, over the "
                              f"{MAX_UNPACKED >> 20} MiB limit (MAX_UNPACKED)")
            os.makedirs(tmp)
            _extract(archive, members, tmp)
    except (zipfile.BadZipFile, _TooBig) as error:
        _remove(tmp)
        os.remove(zip_path)  # not the dataset: the next run downloads it afresh
        what = "damaged" if isinstance(error, zipfile.BadZipFile) else "not the expected archive"
        raise UserError(f"{zip_path} is {what} ({error}) and was deleted: rerun `make reproduce` "
                        "to download it again") from None
    except OSError as error:  # the disk is full, or parent/ is not writable
        _remove(tmp)
        fix = (f"free about {MAX_UNPACKED >> 20} MiB there" if files.is_full(error)
               else "fix that")
        raise UserError(f"unpacking {zip_path} into {parent} failed ({error.strerror or error}); "
                        f"nothing was kept: {fix}, then rerun `make reproduce`") from None
    except BaseException:  # KeyboardInterrupt, say: still no half-unpacked folder
        _remove(tmp)
        raise
    inner = os.path.join(tmp, FOLDER)
    if not os.path.isdir(inner):
        _remove(tmp)
        raise UserError(f"{zip_path} has no {FOLDER}/ folder: delete it and rerun `make reproduce`")
    os.replace(inner, os.path.join(parent, FOLDER))
    _remove(tmp)
    return os.path.join(parent, FOLDER)


def _extract(archive, members, into):
    """Write the members under `into`, counting the bytes really written: zipfile already stops
    each member at its declared size, but the total is checked here whatever a member claims.
    A CRC mismatch surfaces as BadZipFile when a member's last bytes are read."""
    written = 0
    for member in members:
        name = _member_path(member.filename)
        target = os.path.join(into, *name.split("/"))
        if member.is_dir():
            os.makedirs(target, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            out = open(target, "xb")  # x: an entry twice is refused, not overwritten
        except FileExistsError:
            raise zipfile.BadZipFile(f"two entries named {name!r}") from None
        with archive.open(member) as source, out:
            while chunk := source.read(CHUNK):
                written += len(chunk)
                if written > MAX_UNPACKED:
                    raise _TooBig(f"unpacks to more than the {MAX_UNPACKED >> 20} MiB limit "
                                  "(MAX_UNPACKED)")
                out.write(chunk)


def _member_path(name):
    """A member's name as a path inside the unpacking folder, or BadZipFile: the real archive
    has only relative names, so an absolute one or one climbing out with .. is refused."""
    path = posixpath.normpath(name.replace("\\", "/"))
    if path.startswith("/") or path == ".." or path.startswith("../"):
        raise zipfile.BadZipFile(f"an entry named {name!r} would land outside the folder")
    return path


def _remove(path):
    """Remove a file, a link (never followed) or a folder, if there is one."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except FileNotFoundError:
        pass


def verify(folder, expected=EXPECTED):
    """The structure and the image counts of the dataset, or a UserError that lists the problems."""
    problems = []
    for split, classes in expected.items():
        for class_name, count in classes.items():
            where = os.path.join(folder, split, class_name)
            found = (sum(datasets.is_image_candidate(os.path.join(where, f))
                         for f in os.listdir(where)) if os.path.isdir(where) else None)
            if found != count:
                problems.append(f"{split}/{class_name} has "
                                f"{'no folder' if found is None else found} "
                                f"(expected {count} images)")
    if problems:
        archive = os.path.join(DOWNLOADS, FOLDER + ".zip")
        raise UserError(f"{folder} is not the expected dataset: {'; '.join(problems)}; delete it "
                        f"(and {archive}) and rerun `make reproduce`")
    return folder


# --------------------------------------------------------------------------------------------
# Ours beside the article's
# --------------------------------------------------------------------------------------------

def compare(config):
    evaluation = registry.evaluation(config)
    titles = {"logreg": "feature extraction, logistic regression",
              "dense": "feature extraction, dense head",
              "finetuned": f"fine-tuning {config.unfreeze} + head"}
    results, lines = {}, []
    for model in registry.NAMES:
        title, validation = titles[model], registry.record(config, model).validation
        test = evaluation.models.get(model, {}).get("accuracy")
        results[model] = {"title": title, "validation": validation.get("accuracy"), "test": test,
                          "article": ARTICLE.get(model)}
        lines.append(f"  {title:<42} {_pct(validation.get('accuracy')):>10} {_pct(test):>10} "
                     f"{_pct(ARTICLE.get(model)):>10}")
    out = artifacts.path(config, RESULTS)
    artifacts.write_json(out, {"results": results, "config": config.to_dict(),
                               "split": evaluation.split, "images": evaluation.images})
    print(f"\nThe article's experiment, ours beside the article's ({config.models_dir}):")
    print(f"  {'':<42} {'validation':>10} {evaluation.split:>10} {'article':>10}")
    print("\n".join(lines))
    if evaluation.weights_notice:
        warn(evaluation.weights_notice)
    print(f"report: {artifacts.path(config, artifacts.REPORT)}")
    return ReproduceResult(config.data, results, out)


def _pct(value):
    return "-" if value is None else f"{100 * value:.1f}%"
