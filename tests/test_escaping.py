"""Names chosen by someone else (class folders, file names, LABELS cells, NAME) reach every
medium we write inert: Markdown, HTML, CSV cells, the terminal and matplotlib's text; and the
figures' thumbnails survive any file swapped in after extract."""
import csv
import io
import os
import shutil
import string
import struct
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import edit_json, make_image_folder
from markdown_it import MarkdownIt
from PIL import Image

from pipeline import audit, batch, evaluate, extract, predict, report, train_head
from pipeline.config import NAME_PATTERN, UserError
from pipeline.fs import artifacts, escape
from pipeline.reporting import pictures, thumbnails

MARKDOWN_PAYLOADS = ['"><svg onload=alert(2)>', "![pic](http:evil.example)",
                     "a[click](evil.html)", "<img src=x onerror=alert(1)>", "x|y`z`**b**",
                     "<https://evil.example>"]
FORMULA_PAYLOADS = ['=HYPERLINK("http://evil.example","x")', "+cmd|' /C calc'!A0", "-2+3",
                    "@SUM(1)", "\t=1", "'=already quoted"]
TERMINAL_PAYLOADS = ["osc52\x1b]52;c;SGVsbG8=\x07", "title\x1b]0;pwned\x07", "clear\x1b[2J",
                     "c1\x9b31m", "bidi\u202egnp"]
ACTIVE_HTML = ("<svg", "<img", "<a ", "<script", "<code", "<strong")


def rendered(markdown_text):
    """The HTML a CommonMark viewer with tables and raw HTML makes of `markdown_text`."""
    return MarkdownIt("commonmark").enable("table").render(markdown_text)


def no_formula_cell(path):
    with open(path, newline="", encoding="utf-8") as f:
        cells = [cell for row in csv.reader(f) for cell in row]
    return not any(cell[:1] in ("=", "+", "-", "@", "\t", "\r") for cell in cells)


def bomb_png(path):
    """A PNG whose header claims 20000 x 20000 pixels: Pillow refuses it on opening."""
    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000,
                                                                       8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


# --- Markdown and HTML ------------------------------------------------------------------------

@pytest.mark.parametrize("payload", MARKDOWN_PAYLOADS)
def test_markdown_text_renders_as_the_text_itself(payload):
    text = escape.markdown_text(payload)
    for line in (f"# {text}", f"| a |\n|---|\n| {text} |"):
        html = rendered(line)
        assert not any(tag in html for tag in ACTIVE_HTML), html
    assert escape.html_text(payload) in rendered(escape.markdown_text(payload))


def test_batch_summary_shows_hostile_names_inert(tmp_path):
    rows = []
    for i, payload in enumerate(MARKDOWN_PAYLOADS + FORMULA_PAYLOADS):
        row = dict.fromkeys(batch.COLUMNS, "")
        row.update(dataset=f"set{i}", data=payload, status="failed", classes=2,
                   class_names=f"{payload}; {payload}", error=payload)
        rows.append(row)
    result = batch.BatchResult(rows, str(tmp_path / "batch_summary.csv"),
                               str(tmp_path / "batch_summary.md"))
    batch.write_summary(result)
    table = [line for line in open(result.md_path, encoding="utf-8") if line.startswith("|")]
    html = rendered("".join(table))
    assert html.count("<tr>") == len(rows) + 1 and not any(tag in html for tag in ACTIVE_HTML)
    assert no_formula_cell(result.csv_path)
    with open(result.csv_path, newline="", encoding="utf-8") as f:  # read back as written
        assert [r["data"] for r in escape.csv_dicts(f)] == MARKDOWN_PAYLOADS + FORMULA_PAYLOADS


def test_a_name_with_markdown_titles_the_report_as_text(prepared):
    config = prepared((extract.run, train_head.run, evaluate.run), head="logreg",
                      name="a[click](evil.html)")
    result = report.run(config)
    title = open(result.path, encoding="utf-8").readline()
    assert "<a " not in rendered(title) and "a[click](evil.html)" in rendered(title)
    page = open(os.path.join(config.models_dir, report.HTML), encoding="utf-8").read()
    assert "evil.html" in page and 'href="evil.html"' not in page


# --- CSV ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("payload", FORMULA_PAYLOADS + ["plain", "", "a=b"])
def test_csv_cell_is_undone_exactly(payload):
    written = escape.csv_cell(payload)
    assert written[:1] not in ("=", "+", "-", "@", "\t", "\r")
    assert escape.csv_cell_read(written) == payload


def test_skipped_csv_neutralises_names_and_the_report_shows_them_as_named(tmp_path, make_config):
    data = tmp_path / "data"
    make_image_folder(data / "set", per_class=6)  # horizontal_NN.jpg, vertical_NN.jpg
    names = sorted(os.listdir(data / "set" / "horizontal")) + sorted(
        os.listdir(data / "set" / "vertical"))
    for name in names:
        shutil.move(data / "set" / name.split("_")[0] / name, data / name)
    shutil.rmtree(data / "set")
    with open(tmp_path / "labels.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("filename", "label")] + [(n, n.split("_")[0]) for n in names]
                                + [(payload, "horizontal") for payload in FORMULA_PAYLOADS[:4]])
    config = make_config(str(data), labels=str(tmp_path / "labels.csv"), name="csv",
                         head="logreg", split="50/50/0")
    extract.run(config)
    skipped = os.path.join(config.features_dir, "skipped.csv")
    assert no_formula_cell(skipped)
    train_head.run(config)
    evaluate.run(config)
    text = open(report.run(config).path, encoding="utf-8").read()
    for payload in FORMULA_PAYLOADS[:4]:  # as the LABELS file names it, escaped for Markdown
        assert f"| {escape.markdown_text(payload)} |" in text


def test_the_report_shows_the_audit_csvs_names_without_the_spreadsheet_prefix(tmp_path):
    columns = ["path", "split", "label", "suggested", "label_probability"]
    with io.StringIO(newline="") as f:
        writer = escape.csv_writer(f)
        writer.writerow(columns)
        writer.writerows([payload, "train", "=cmd|x", "b", 0.1] for payload in FORMULA_PAYLOADS)
        data = f.getvalue().encode("utf-8")
    summary = {"outputs": {audit.LABEL_ISSUES: pictures.write(str(tmp_path), audit.LABEL_ISSUES,
                                                                data, "csv")}}
    text = "\n".join(report._audit_table(str(tmp_path), summary, audit.LABEL_ISSUES,
                                         "Likely label errors", columns))
    for payload in FORMULA_PAYLOADS:
        assert f"| {escape.markdown_text(payload)} | train | =cmd\\|x |" in text


# --- The terminal -------------------------------------------------------------------------------

def test_predict_prints_hostile_file_names_escaped(prepared, tmp_path, capsys):
    config = prepared((extract.run, train_head.run), head="logreg")
    images = tmp_path / "new"
    images.mkdir()
    picture = next(p for p in sorted((tmp_path / "data" / "horizontal").iterdir()))
    for payload in TERMINAL_PAYLOADS:
        shutil.copy(picture, images / f"{payload}.jpg")
        (images / f"broken{payload}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    capsys.readouterr()
    result = predict.run(config.replace(images=str(images)))
    out = capsys.readouterr().out
    assert result.predicted == len(TERMINAL_PAYLOADS) and result.skipped == len(TERMINAL_PAYLOADS)
    assert not any(c in out for c in "\x1b\x07\x9b\u202e")
    for payload in TERMINAL_PAYLOADS[:3]:
        assert escape.terminal_text(payload) in out


@pytest.mark.parametrize("payload", TERMINAL_PAYLOADS + ["caf\udce9", "line\nbreak"])
def test_terminal_text_leaves_no_control_character(payload):
    shown = escape.terminal_text(payload)
    assert shown.isprintable() and shown.encode("utf-8")  # printable and encodable: no surrogate
    assert shown.startswith(payload[:2])


# --- matplotlib's text --------------------------------------------------------------------------

def test_dollar_signs_in_class_and_file_names_are_drawn_as_text(tmp_path, make_config):
    data = make_image_folder(tmp_path / "data", classes=("$\\foo$", "plain"), per_class=6)
    near_copy = os.path.join(data, "plain", "$\\bar$.png")  # a near-duplicate: audit.png shows it
    with Image.open(os.path.join(data, "plain", "plain_00.jpg")) as original:
        original.save(near_copy)  # lossless: random weights at 32 px see a re-encoding as another
    config = make_config(data, head="logreg", split="50/50/0", audit_folds=2)
    extract.run(config)
    train_head.run(config)
    evaluate.run(config)
    result = audit.run(config)
    pairs, _ = audit.output_rows(result.folder, result.summary, audit.NEAR_DUPLICATES)
    assert any(row["path_b"].endswith("$\\bar$.png") or row["path_a"].endswith("$\\bar$.png")
               for row in pairs)
    assert audit.output(result.folder, result.summary, audit.PICTURE)[0] is not None
    assert os.path.isfile(os.path.join(result.folder, audit.SUMMARY))
    assert escape.markdown_text("$\\foo$") in open(report.run(config).path, encoding="utf-8").read()


# --- Thumbnails ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bomb", "truncated", "text", "fifo", "missing", "empty"])
def test_a_file_that_cannot_be_shown_is_a_placeholder(tmp_path, kind):
    path = tmp_path / "x.png"
    if kind == "bomb":
        bomb_png(path)
    elif kind == "truncated":
        Image.new("RGB", (64, 64), "red").save(path)
        path.write_bytes(path.read_bytes()[:60])
    elif kind == "text":
        path.write_text("not a picture")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "empty":
        path.write_bytes(b"")
    picture, shown = thumbnails.thumbnail(str(path))
    assert not shown and picture is thumbnails.PLACEHOLDER


def test_a_picture_becomes_a_thumbnail_within_its_side(tmp_path):
    Image.new("RGB", (400, 200), "red").save(tmp_path / "x.png")
    picture, shown = thumbnails.thumbnail(str(tmp_path / "x.png"))
    assert shown and picture.size == (thumbnails.SIDE, thumbnails.SIDE // 2)


def test_the_audit_picture_survives_a_bomb_swapped_in_after_extract(tmp_path):
    bomb_png(tmp_path / "a.png")
    Image.new("RGB", (40, 40), "blue").save(tmp_path / "b.png")
    cached = SimpleNamespace(paths=np.array(["a.png", "b.png"]), splits=np.array(["train", "test"]),
                             class_names=["x", "y"], y=np.array([0, 1]), root=str(tmp_path))
    pairs = {"i": np.array([0]), "j": np.array([1]), "similarity": np.array([0.99])}
    issues = {"rows": np.array([0]), "suggested": np.array([1]), "given": np.array([0.2, 0.9])}
    png = audit._picture(cached, pairs, issues, (np.array([1]), np.array([0.1, 9.0]), None))
    assert png is not None and Image.open(io.BytesIO(png)).size[0] > 0


def test_the_report_survives_a_bomb_swapped_in_after_evaluate(prepared, tmp_path):
    config = prepared((extract.run, train_head.run, evaluate.run), head="logreg")
    bomb_png(tmp_path / "data" / "horizontal" / "bomb.png")
    mistake = {"path": "horizontal/bomb.png", "true": "horizontal", "predicted": "vertical",
               "probability": 0.9}
    def swap(evaluation):  # the images of this test's copy, one of them now a bomb
        evaluation["data_root"] = config.data
        evaluation["models"]["logreg"].update(misclassified=[mistake], misclassified_count=1)
    edit_json(artifacts.path(config, artifacts.EVALUATION), swap)
    text = open(report.run(config).path, encoding="utf-8").read()
    assert "could not be opened" in text  # the one mistake is not shown, the report is written


# --- NAME ---------------------------------------------------------------------------------------

def test_the_name_refusal_lists_every_character_a_name_may_hold(make_config, tmp_path):
    with pytest.raises(UserError, match="is not a dataset name") as refused:
        make_config(str(tmp_path), name="a/b")
    allowed = [c for c in string.punctuation + " " if NAME_PATTERN.fullmatch("a" + c)]
    message = str(refused.value).split("pass NAME=")[1]
    assert allowed and all(c in message for c in allowed if c != " ")
    assert "spaces" in message and "100" in message
