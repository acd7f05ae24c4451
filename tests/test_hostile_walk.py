"""Hostile and careless input: the directory walk, names that are not UTF-8, images over
the pixel budget, and one-line errors for a DATA that is a file and for unreadable LABELS files.

Every test checks three things: nothing outside features/<NAME> and models/<NAME> changed
(`Untouched`), the outcome (rows, counts or exit status) and the reason or the one-line message.
"""
import csv
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from helpers import make_image_folder
from keras.applications import vgg16
from PIL import Image
from trained_run import shared_trained_run

from pipeline import __main__ as cli
from pipeline import extract, predict
from pipeline.config import UserError
from pipeline.data import images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET = "budget of 67 MP (8192x8192) per image: downscale it"
LINK_TO_FOLDER = "link to a folder: not followed; link the files themselves"
BROKEN_LINK = "broken link: its target does not exist"
NOT_UTF8_FILE = "file name is not valid UTF-8: rename it"
NOT_UTF8_FOLDER = "folder name is not valid UTF-8: rename it"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

class Untouched:
    """A record of everything under `root` (type, size, mtime, link target; nothing is opened, so
    FIFOs are safe) except the features and models roots, which may hold only NAME."""

    def __init__(self, root, features_root, models_root, name):
        self.root, self.name = str(root), name
        self.outputs = (str(features_root), str(models_root))
        self.before = self._snapshot()

    def _snapshot(self):
        seen, pending = {}, [self.root]
        while pending:  # a stack, not os.walk: one test has a tree 1200 folders deep
            with os.scandir(pending.pop()) as listing:
                for entry in listing:
                    if entry.path in self.outputs:
                        continue
                    st = entry.stat(follow_symlinks=False)
                    seen[entry.path] = (st.st_mode, st.st_size, st.st_mtime_ns,
                                        os.readlink(entry.path) if entry.is_symlink() else None)
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
        return seen

    def check(self):
        assert self._snapshot() == self.before
        for output in self.outputs:
            assert not os.path.exists(output) or os.listdir(output) in ([], [self.name])


@pytest.fixture
def world(tmp_path, monkeypatch):
    """Runs from an empty working directory inside tmp_path, so a stray relative write would be
    caught by Untouched too."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path


@pytest.fixture
def deadline():
    """Fail instead of hanging: before the fix, a FIFO in DATA blocked extract forever."""
    def expire(signum, frame):  # pytest.fail: not an OSError, which the code under test may catch
        pytest.fail("still running after 60 s: something blocks (a FIFO opened?)")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 60)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:  # strict: the file must be valid UTF-8
        return list(csv.DictReader(f))


def skipped_of(config):
    return {r["path"]: r["reason"] for r in read_csv(os.path.join(config.features_dir,
                                                                   "skipped.csv"))}


def copy_image(source, folder, name):
    """Copy an image to folder/name, where name may be bytes (a name that is not UTF-8)."""
    os.makedirs(folder, exist_ok=True)
    with open(source, "rb") as f, open(os.path.join(os.fsencode(folder), os.fsencode(name)),
                                       "wb") as g:
        g.write(f.read())


# What the walk does with each kind of entry. Each maker puts one entry called `name` in
# `folder` and returns the reason expected for it (None: followed, read as an image).
def _fifo(folder, outside, name):
    os.mkfifo(os.path.join(folder, name))
    return "not a regular file (FIFO)"


def _socket(folder, outside, name):
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(os.path.join(folder, name))
    return "not a regular file (socket)"


def _device(folder, outside, name):  # a link to a device: making one needs no privilege
    os.symlink(os.devnull, os.path.join(folder, name))
    return "not a regular file (character device)"


def _loop(folder, outside, name):  # 24 images became 504 rows
    os.symlink(".", os.path.join(folder, name))
    return LINK_TO_FOLDER


def _out_of_data(folder, outside, name):  # a link to a folder of images elsewhere
    os.symlink(outside, os.path.join(folder, name))
    return LINK_TO_FOLDER


def _broken(folder, outside, name):
    os.symlink(os.path.join(outside, "no_such_file.jpg"), os.path.join(folder, name))
    return BROKEN_LINK


def _self_link(folder, outside, name):
    os.symlink(name, os.path.join(folder, name))
    return "link cannot be followed (Too many levels of symbolic links)"


def _file_link(folder, outside, name):  # followed: datasets are assembled with links to files
    os.symlink(os.path.join(outside, "x", "x_00.jpg"), os.path.join(folder, name))
    return None


ENTRIES = {"fifo": _fifo, "socket": _socket, "device": _device, "loop": _loop,
           "out_of_data": _out_of_data, "broken": _broken, "self_link": _self_link,
           "file_link": _file_link}


def make_outside(tmp_path):
    """A folder of images outside DATA, the target of links."""
    return make_image_folder(tmp_path / "outside", classes=("x",), per_class=2, seed=5)


# --------------------------------------------------------------------------------------------
# 1. The directory walk
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(ENTRIES))
def test_extract_walk_reads_only_regular_files_and_links_to_them(world, make_config, deadline,
                                                                 kind):
    data = make_image_folder(world / "data")  # 2 classes x 6 images
    outside = make_outside(world)
    reason = ENTRIES[kind](os.path.join(data, "horizontal"), outside, "entry.jpg")
    config = make_config(data)
    untouched = Untouched(world, config.features_root, config.models_root, "data")

    result = extract.run(config)

    untouched.check()
    if reason is None:  # the link to a file is an image of class horizontal
        assert (result.rows, result.skipped) == (13, 0) and skipped_of(config) == {}
    else:
        assert (result.rows, result.skipped) == (12, 1)
        assert skipped_of(config) == {"horizontal/entry.jpg": reason}


def test_links_to_data_and_to_class_folders_are_followed(world, make_config):
    real = make_image_folder(world / "real", classes=("horizontal",), per_class=6)
    make_image_folder(world / "elsewhere", classes=("vertical",), per_class=6, seed=1)
    os.symlink(os.path.join(world, "elsewhere", "vertical"), os.path.join(real, "vertical"))
    os.symlink(real, world / "data")  # DATA itself is a link
    config = make_config(str(world / "data"))
    untouched = Untouched(world, config.features_root, config.models_root, "data")

    result = extract.run(config)

    untouched.check()
    assert (result.rows, result.skipped) == (12, 0)
    assert skipped_of(config) == {}


def test_a_very_deep_tree_is_walked(world, make_config):
    # os.walk recurses once per level: 1200 folders deep ended in a RecursionError
    data = make_image_folder(world / "data")
    deep = os.path.join(data, "horizontal")
    for _ in range(1200):
        deep = os.path.join(deep, "d")
        os.mkdir(deep)
    shutil.copy(os.path.join(data, "vertical", "vertical_00.jpg"), os.path.join(deep, "deep.jpg"))
    config = make_config(data)
    untouched = Untouched(world, config.features_root, config.models_root, "data")
    try:
        result = extract.run(config)

        untouched.check()
        assert (result.rows, result.skipped) == (13, 0)
        assert skipped_of(config) == {}
    finally:  # bottom up: shutil.rmtree, and so pytest's clean-up, recurse as os.walk does
        os.remove(os.path.join(deep, "deep.jpg"))
        while deep != os.path.join(data, "horizontal"):
            os.rmdir(deep)
            deep = os.path.dirname(deep)


@pytest.mark.parametrize("kind", ["fifo", "loop"])
def test_labels_csv_datasets_use_the_same_walk(world, make_config, deadline, kind):
    data = make_image_folder(world / "data")
    outside = make_outside(world)
    with open(os.path.join(data, "labels.csv"), "w") as f:
        f.write("filename,label\n" + "".join(f"{c}_{i:02d}.jpg,{c}\n" for c in
                                             ("horizontal", "vertical") for i in range(6)))
    reason = ENTRIES[kind](data, outside, "entry")
    config = make_config(data, labels="labels.csv")
    untouched = Untouched(world, config.features_root, config.models_root, "data")

    result = extract.run(config)

    untouched.check()
    assert (result.rows, result.skipped) == (12, 1)
    assert skipped_of(config) == {"entry": reason}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return shared_trained_run(tmp_path_factory)


def predict_world(world, trained):
    """IMAGES=world/new with two images; a copy of the trained models under world/models."""
    shutil.copytree(trained.models_dir, world / "models" / trained.name)
    config = trained.replace(models_root=str(world / "models"), images=str(world / "new"),
                             model="logreg")
    for name in ("a.jpg", "b.jpg"):
        copy_image(os.path.join(trained.data, "horizontal", "horizontal_00.jpg"), world / "new",
                   name)
    return config


@pytest.mark.parametrize("kind", sorted(ENTRIES))
def test_predict_walk_reads_only_regular_files_and_links_to_them(world, trained, deadline, kind):
    config = predict_world(world, trained)
    outside = make_outside(world)
    reason = ENTRIES[kind](config.images, outside, "entry.jpg")
    untouched = Untouched(world, world / "features", config.models_root, trained.name)

    result = predict.run(config)

    untouched.check()
    predicted = [os.path.basename(r["path"]) for r in read_csv(result.path)]
    skipped = read_csv(os.path.join(config.models_dir, predict.SKIPPED))
    if reason is None:
        assert predicted == ["a.jpg", "b.jpg", "entry.jpg"] and result.skipped == 0
    else:
        assert predicted == ["a.jpg", "b.jpg"] and result.skipped == 1
        assert skipped == [{"path": f"{config.images}/entry.jpg", "reason": reason}]


@pytest.mark.parametrize("target, message", [
    ("fifo", r"IMAGES=.*pipe is not a regular file \(FIFO\): pass an image file or a folder"),
    ("not_utf8", r"IMAGES=.*new\\xff: the name is not valid UTF-8: rename it"),
], ids=["fifo", "not_utf8"])
def test_predict_refuses_an_images_target_it_cannot_read(world, trained, deadline, target,
                                                         message):
    config = predict_world(world, trained)
    if target == "fifo":
        os.mkfifo(world / "pipe")
        images_arg = str(world / "pipe")
    else:
        images_arg = os.fsdecode(os.path.join(os.fsencode(world), b"new\xff"))
        os.rename(config.images, images_arg)
    untouched = Untouched(world, world / "features", config.models_root, trained.name)

    with pytest.raises(UserError, match=message):
        predict.run(config.replace(images=images_arg))

    untouched.check()


# --------------------------------------------------------------------------------------------
# 2. Names that are not UTF-8
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, reason", [("file", NOT_UTF8_FILE),
                                          ("folder", NOT_UTF8_FOLDER)], ids=["file", "folder"])
def test_extract_skips_a_name_that_is_not_utf8(world, make_config, kind, reason):
    data = make_image_folder(world / "data")
    source = os.path.join(data, "vertical", "vertical_00.jpg")
    if kind == "file":
        copy_image(source, os.path.join(data, "horizontal"), b"caf\xe9.jpg")
        listed = "horizontal/caf\\xe9.jpg"
    else:
        copy_image(source, os.path.join(os.fsencode(data), b"horizontal", b"caf\xe9"), b"a.jpg")
        listed = "horizontal/caf\\xe9"
    config = make_config(data)
    untouched = Untouched(world, config.features_root, config.models_root, "data")

    result = extract.run(config)  # before: a traceback (TensorFlow cannot encode the path)

    untouched.check()
    assert (result.rows, result.skipped) == (12, 1)
    assert skipped_of(config) == {listed: reason}


@pytest.mark.parametrize("kind, reason", [("file", NOT_UTF8_FILE),
                                          ("folder", NOT_UTF8_FOLDER)], ids=["file", "folder"])
def test_predict_skips_a_name_that_is_not_utf8(world, trained, kind, reason):
    config = predict_world(world, trained)
    source = os.path.join(config.images, "a.jpg")
    if kind == "file":
        copy_image(source, config.images, b"caf\xe9.jpg")
    else:
        copy_image(source, os.path.join(os.fsencode(config.images), b"caf\xe9"), b"a.jpg")
    untouched = Untouched(world, world / "features", config.models_root, trained.name)

    result = predict.run(config)

    untouched.check()
    assert [os.path.basename(r["path"]) for r in read_csv(result.path)] == ["a.jpg", "b.jpg"]
    assert result.skipped == 1
    assert read_csv(os.path.join(config.models_dir, predict.SKIPPED)) == [
        {"path": f"{config.images}/caf\\xe9{'.jpg' * (kind == 'file')}", "reason": reason}]


# --------------------------------------------------------------------------------------------
# 3. The pixel budget
# --------------------------------------------------------------------------------------------

def _png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_blank_png(path, width, height):
    """An RGB PNG of zeros written by hand, row by row: a few hundred KB that decode to
    width * height * 3 bytes (and more inside Pillow), without ever holding the pixels."""
    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * width)  # filter byte "none", then the pixels
    idat = b"".join([compressor.compress(row) for _ in range(height)] + [compressor.flush()])
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n"
                + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))
    return str(path)


def write_big_canvas_gif(path, width, height):
    """A two-frame animated GIF of 1x1 frames on a width x height canvas: under 100 bytes, but
    Pillow decodes the whole canvas for the first frame."""
    frames = [Image.new("P", (1, 1), 0), Image.new("P", (1, 1), 1)]
    frames[0].putpalette([255, 255, 255, 0, 0, 0])
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    gif = bytearray(buffer.getvalue())
    gif[6:10] = struct.pack("<HH", width, height)  # the logical screen
    with open(path, "wb") as f:
        f.write(gif)
    return str(path)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bombs")
    return {
        "png": write_blank_png(folder / "bomb.png", 9000, 9000),   # 243 MB decoded, 236 KB
        "gif": write_big_canvas_gif(folder / "anim.gif", 10000, 10000),  # Pillow warns
        "huge_gif": write_big_canvas_gif(folder / "huge.gif", 20000, 20000),  # Pillow refuses
        "control": write_blank_png(folder / "control.png", 4000, 4000),  # under the budget
    }


# pytest resets the warning filters for every test, dropping the one images.py installs for
# Pillow's bomb warning; the subprocess test below checks that the command line prints none.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("bomb, reason", [
    ("png", f"image of 9000x9000 pixels (81 MP) is over the {BUDGET}"),
    ("gif", f"image of 10000x10000 pixels (100 MP) is over the {BUDGET}"),
    ("huge_gif", f"image of more than 179 MP is over the {BUDGET}"),
], ids=["png", "gif", "huge_gif"])
def test_extract_skips_an_image_over_the_pixel_budget(world, make_config, bombs, bomb, reason):
    data = make_image_folder(world / "data")
    shutil.copy(bombs[bomb], os.path.join(data, "horizontal", os.path.basename(bombs[bomb])))
    config = make_config(data)
    untouched = Untouched(world, config.features_root, config.models_root, "data")

    result = extract.run(config)

    untouched.check()
    assert (result.rows, result.skipped) == (12, 1)
    assert skipped_of(config) == {f"horizontal/{os.path.basename(bombs[bomb])}": reason}


# Run in a fresh process, so the peak (VmHWM) is this process's own: reset to the current size
# after the imports, then read after each load.
MEASURE = r"""
import json, re, sys
from pipeline.data import images

def peak():
    return int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

out = []
for path in sys.argv[1:]:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
    except OSError:
        pass  # then the growth is measured from an older peak: smaller, never larger
    before = peak()
    reason = images.try_load_image(path, 32)[1]
    out.append({"reason": reason, "grew": peak() - before})
print(json.dumps(out))
"""


def test_refusing_an_image_over_the_budget_costs_no_memory(world, bombs):
    untouched = Untouched(world, world / "features", world / "models", "")
    env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", MEASURE, bombs["png"], bombs["gif"],
                           bombs["control"]], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    png, gif, control = json.loads(done.stdout)

    untouched.check()
    decoded = 9000 * 9000 * 3  # the bomb's RGB pixels alone; Pillow holds 4 bytes per pixel
    assert png["reason"].endswith(BUDGET) and gif["reason"].endswith(BUDGET)
    assert png["grew"] < decoded / 10 and gif["grew"] < decoded / 10, (png, gif)
    # the measurement sees a decode: the 4000x4000 control (48 MB of RGB) is loaded, and grows it
    assert control["reason"] == "" and control["grew"] > 4000 * 4000 * 3, control
    assert "DecompressionBomb" not in done.stderr  # Pillow's warning is not printed either


def test_a_big_camera_jpeg_is_decoded_at_a_reduced_scale_with_unchanged_numbers(tmp_path):
    # 8400x8000 (67.2 MP) is just over the budget at full scale; libjpeg decodes it at 1/8.
    path = str(tmp_path / "camera.jpg")
    Image.new("RGB", (8400, 8000), (200, 30, 30)).save(path, quality=50)
    with Image.open(path) as img:  # the loader's steps, written out: the numbers do not change
        img.draft("RGB", (32, 32))
        assert img.size == (1050, 1000)
        expected = vgg16.preprocess_input(
            np.asarray(img.convert("RGB").resize((32, 32), Image.BILINEAR), np.float32))
    np.testing.assert_array_equal(images.load_image(path, 32), expected)


# --------------------------------------------------------------------------------------------
# 4. One line for a DATA that is a file and for unreadable LABELS files
# --------------------------------------------------------------------------------------------

def _data_is_a_file(world):
    (world / "photos.zip").write_bytes(b"PK\x03\x04")
    return str(world / "photos.zip"), ""


def _data_is_a_fifo(world):
    os.mkfifo(world / "photos")
    return str(world / "photos"), ""


def _class_not_utf8(world):
    data = make_image_folder(world / "photos")
    os.rename(os.path.join(data, "vertical"), os.fsdecode(os.path.join(os.fsencode(data),
                                                                       b"caf\xe9")))
    return data, ""


def _labels(first_lines):
    def make(world):
        data = make_image_folder(world / "photos")
        with open(os.path.join(data, "labels.csv"), "wb") as f:
            f.write(first_lines)
        return data, "labels.csv"
    return make


def _labels_unreadable(world):
    # a file the user names but that cannot be read: running as root, no permission bits stop
    # a read, but this one fails for anyone (reading address 0 of one's own memory)
    return make_image_folder(world / "photos"), "/proc/self/mem"


SHADOW = b"root:$6$SECRETHASH:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n"


@pytest.mark.parametrize("make, message", [
    (_data_is_a_file, r"DATA=.*photos\.zip is a file, not a folder: pass DATA=<folder with one "
                      r"subfolder of images per class>"),
    (_data_is_a_fifo, r"DATA=.*photos is a FIFO, not a folder: pass DATA=<folder"),
    (_class_not_utf8, r"class folder '.*photos/caf\\xe9': folder name is not valid UTF-8: "
                      r"rename it"),
    (_labels("filename,label\ncaf\xe9.jpg,chat\n".encode("cp1252")),
     r"LABELS file .*labels\.csv is not UTF-8 text \(it has the byte 0xe9\): save it as UTF-8"),
    (_labels("filename,label\n".encode("utf-16")),
     r"LABELS file .*labels\.csv is not UTF-8 text \(it has the byte 0xff\): save it as UTF-8"),
    (_labels(SHADOW), r"labels\.csv has no column 'filename': its first line has 1 column\(s\) "
                      r"separated by ','; pass LABEL_COLUMNS="),
    (_labels(b"filename,label\n" + b"a" * 200_000 + b",cat\n"),  # refused by its line's length
     r"LABELS file .*labels\.csv has a line longer than 65536 characters: it is not a labels "
     r"CSV; pass LABELS=<csv"),
    (_labels_unreadable, r"LABELS file /proc/self/mem cannot be read \(Input/output error\): pass "
                         r"LABELS=<csv"),
], ids=["data_file", "data_fifo", "class_not_utf8", "labels_cp1252", "labels_utf16",
        "labels_not_quoted", "labels_huge_field", "labels_unreadable"])
def test_extract_stops_with_one_line(world, deadline, capsys, make, message):
    data, labels = make(world)
    features, models = world / "features", world / "models"
    untouched = Untouched(world, features, models, os.path.basename(data))
    argv = ["extract", "--data", data, "--weights", "none", "--size", "32",
            "--features-root", str(features), "--models-root", str(models)]

    status = cli.main(argv + (["--labels", labels] if labels else []))

    untouched.check()
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert "SECRET" not in err and "root:" not in err  # a file's content is never quoted
