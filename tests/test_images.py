"""The one image loader, format sniffing, dataset discovery and content-hash splits."""
import hashlib
import os

import numpy as np
import pytest
from keras.applications import vgg16
from PIL import Image

from pipeline.config import UserError
from pipeline.data import backbones, datasets, images


def save(img, path, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, **kwargs)
    return str(path)


def test_load_image_is_resize_then_vgg16_preprocessing(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    path = save(Image.fromarray(pixels), tmp_path / "a.png")
    expected = vgg16.preprocess_input(
        np.asarray(Image.fromarray(pixels).resize((32, 32), Image.BILINEAR), np.float32))
    loaded = images.load_image(path, 32)
    assert loaded.shape == (32, 32, 3) and loaded.dtype == np.float32
    np.testing.assert_allclose(loaded, expected, atol=1e-4)


def test_exif_orientation_is_applied(tmp_path):
    # A tall picture stored sideways with "rotate 90 CW to view" must load like the upright one.
    upright = np.zeros((40, 20, 3), np.uint8)
    upright[:10] = 255  # white band at the top
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 270 (i.e. 90 CW) on display
    rotated_path = save(stored, tmp_path / "rotated.png", exif=exif)
    upright_path = save(Image.fromarray(upright), tmp_path / "upright.png")
    np.testing.assert_allclose(images.load_image(rotated_path, 32),
                               images.load_image(upright_path, 32), atol=1e-3)


def _white_after_preprocessing():
    return vgg16.preprocess_input(np.full((1, 1, 3), 255, np.float32))[0, 0]


@pytest.mark.parametrize("make, name", [
    (lambda: Image.new("L", (8, 8), 255), "gray.png"),
    (lambda: Image.new("P", (8, 8), 0).convert("P"), "palette.gif"),
    (lambda: Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "transparent.png"),  # composited on white
    (lambda: Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "cmyk.jpg"),
    (lambda: Image.fromarray(np.full((8, 8), 65535, np.uint16)), "sixteen_bit.png"),
    (lambda: Image.new("LA", (8, 8), (0, 0)), "gray_alpha.png"),
])
def test_every_mode_becomes_white_rgb(tmp_path, make, name):
    img = make()
    if name == "palette.gif":
        img.putpalette([255, 255, 255] * 256)
    loaded = images.load_image(save(img, tmp_path / name), 16)
    assert loaded.shape == (16, 16, 3)
    np.testing.assert_allclose(loaded[4, 4], _white_after_preprocessing(), atol=2.0)


def test_animation_uses_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), (255, 255, 255)), Image.new("RGB", (8, 8), (0, 0, 0))]
    path = str(tmp_path / "anim.gif")
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    np.testing.assert_allclose(images.load_image(path, 8)[0, 0], _white_after_preprocessing(),
                               atol=2.0)


def test_try_load_reports_instead_of_raising(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("not a picture")
    assert images.try_load_image(str(empty), 8)[1] == "empty file (0 bytes)"
    assert "cannot identify" in images.try_load_image(str(text), 8)[1]


def test_sniffing_finds_images_by_content(tmp_path):
    path = save(Image.new("RGB", (4, 4)), tmp_path / "no_extension", format="PNG")
    assert datasets.sniff_format(path) == "png"
    assert datasets.is_image_candidate(path)
    (tmp_path / "notes.txt").write_text("hello")
    assert not datasets.is_image_candidate(str(tmp_path / "notes.txt"))


def test_split_for_is_a_pure_function_of_the_hash():
    fractions = (0.8, 0.1, 0.1)
    hashes = [f"{i:08x}" + "0" * 56 for i in range(0, 2**32, 2**22)]
    splits = [datasets.split_for(h, fractions) for h in hashes]
    # the first 8 hex digits, as a fraction of 2**32, against the cumulative 0.8 and 0.9
    boundaries = {"00000000": "train", "cccccccc": "train", "cccccccd": "validation",
                  "e6666666": "validation", "e6666667": "test", "ffffffff": "test"}
    assert {h: datasets.split_for(h + "f" * 56, fractions) for h in boundaries} == boundaries
    counts = {s: splits.count(s) for s in datasets.SPLITS}
    assert counts == {"train": 820, "validation": 102, "test": 102}


def _tree(root, files):
    for rel in files:
        save(Image.new("RGB", (4, 4)), os.path.join(root, rel))
    return str(root)


def test_discover_folder_layout(tmp_path):
    root = _tree(tmp_path, ["dogs/a.JPG", "cats/b.png", "cats/sub/c.webp"])
    (tmp_path / "cats" / "readme.txt").write_text("not an image")
    dataset = datasets.discover(root)
    assert dataset.layout == "folders" and dataset.class_names == ["cats", "dogs"]
    assert [(f.path, f.label) for f in dataset.files] == [
        ("cats/b.png", 0), ("cats/sub/c.webp", 0), ("dogs/a.JPG", 1)]
    assert dataset.skipped == [("cats/readme.txt", "not an image (extension and content)")]


def test_discover_split_layout_accepts_val_and_carves_test(tmp_path):
    root = _tree(tmp_path, ["train/cat/1.jpg", "train/dog/2.jpg", "val/cat/3.jpg", "val/dog/4.jpg"])
    dataset = datasets.discover(root)
    assert dataset.layout == "splits" and not dataset.has_test_folder
    assert {f.path: f.split for f in dataset.files}["val/cat/3.jpg"] == "validation"
    carved = {datasets.assign_split(dataset, dataset.files[2], f"{i:016x}" + "0" * 48, None)
              for i in range(8)}
    assert carved == {"validation", "test"}


@pytest.mark.parametrize("files, message", [
    ([], "0 class folder"),
    (["only/a.jpg"], "1 class folder"),
])
def test_discover_needs_two_classes(tmp_path, files, message):
    root = _tree(tmp_path / "data", files)
    os.makedirs(root, exist_ok=True)
    with pytest.raises(UserError, match=message):
        datasets.discover(root)


def test_discover_refuses_an_empty_class_and_a_missing_folder(tmp_path):
    root = _tree(tmp_path / "data", ["cats/a.jpg"])
    os.makedirs(os.path.join(root, "dogs"))
    with pytest.raises(UserError, match="dogs.* has no images"):
        datasets.discover(root)
    with pytest.raises(UserError, match="does not exist"):
        datasets.discover(str(tmp_path / "nowhere"))


# The loader's output on two committed files, per preprocess id (images.preprocess_id of each
# backbone). It is part of the cache identity: if load_image changes what it returns, features
# cached before the change must not be reused, so an edit that changes these numbers must also
# change the id (and add its fingerprints here). golden.jpg carries EXIF orientation 6;
# golden.png has an alpha channel. The bases that preprocess inside the model get the pixels.
DECODED = "pil:draft+exif+rgb(white-bg,16bit/257)+bilinear|"
PIXELS = {"golden.jpg": "22d83b68807579a3a9cac8abb100bf6932f6c196436a8e1fd2d9f110db6dd3a4",
          "golden.png": "549a6bac821a230cc59780caab91289444062b683d6a510cb4ca9e8f2c68d061"}
CAFFE = {"golden.jpg": "052e084a100f752d64274eff1156a610b23769274d1e50ebd70f0113716fb8f1",
         "golden.png": "5a507523eabd53a1e6dcea2c5cb940f2637ec4e8a083aeabcb1112c7e8aefdc7"}
GOLDEN = {
    DECODED + "keras.vgg16.preprocess_input(caffe)|v1": CAFFE,
    DECODED + "keras.vgg19.preprocess_input(caffe)|v1": CAFFE,
    DECODED + "keras.resnet_v2.preprocess_input(tf)|v1": {
        "golden.jpg": "5dd76bf769a783603cc8fd8b8f048302e1d17129602e6c638065f8e2461b6430",
        "golden.png": "b0a3ab76e23b78a62b4cddc22f918ad629b534aad60084c395bf97139a1feb25"},
    DECODED + "keras.efficientnet_v2: inside the model (include_preprocessing)|v1": PIXELS,
    DECODED + "keras.convnext: inside the model (include_preprocessing)|v1": PIXELS,
    DECODED + "keras.mobilenet_v3: inside the model (include_preprocessing)|v1": PIXELS,
}


@pytest.mark.parametrize("backbone", list(backbones.TABLE))
@pytest.mark.parametrize("name", ["golden.jpg", "golden.png"])
def test_the_loader_output_is_pinned_to_its_preprocess_id(name, backbone):
    entry = backbones.get(backbone)
    preprocess = images.preprocess_id(entry)
    assert preprocess in GOLDEN, "a new preprocess id: record its fingerprints here"
    array = images.load_image(os.path.join(os.path.dirname(__file__), "data", name), 32,
                              entry.preprocess)
    digest = hashlib.sha256(np.round(array, 3).tobytes()).hexdigest()
    assert digest == GOLDEN[preprocess][name], (
        "load_image returns other numbers than its preprocess id stands for: change the id "
        "(caches of the old one must not be reused) and record the new fingerprints")
