"""`make reproduce`: download with resume, unpack, verify, against a local HTTP server.

The server listens on 127.0.0.1 only, runs in a thread, serves one small zip that the test builds,
and is shut down by the fixture (or by a timer, whatever happens to the test)."""
import errno
import http.server
import io
import os
import re
import socket
import threading
import zipfile

import numpy as np
import pytest
from PIL import Image

from pipeline import reproduce
from pipeline.config import UserError
from pipeline.fs import artifacts

FOLDER = reproduce.FOLDER
TINY = {"train": {"cats": 3, "dogs": 3}, "validation": {"cats": 2, "dogs": 2}}


def build_zip(counts=TINY, pixels=32):
    """cats_and_dogs_filtered/{train,validation}/{cats,dogs}/*.jpg, like the real archive."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("cats_and_dogs_filtered/vectorize.py", "# not an image\n")
        for split, classes in counts.items():
            for class_name, n in classes.items():
                for i in range(n):
                    picture = io.BytesIO()
                    array = rng.uniform(0, 255, (pixels, pixels, 3)).astype(np.uint8)
                    if class_name == "dogs":
                        array[:, ::4] = 255  # something to tell the classes apart
                    Image.fromarray(array).save(picture, "JPEG")
                    archive.writestr(f"cats_and_dogs_filtered/{split}/{class_name}/"
                                     f"{class_name[:-1]}.{i}.jpg", picture.getvalue())
    return buffer.getvalue()


class Handler(http.server.BaseHTTPRequestHandler):
    """GET with HTTP Range; server.cut_first cuts the first response off halfway."""

    def do_GET(self):
        server, body = self.server, self.server.body
        server.ranges.append(self.headers.get("Range"))
        start = 0
        if self.headers.get("Range") and server.honour_range:
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if server.cut_first and len(server.ranges) == 1:
            payload = payload[:len(payload) // 2]  # then the connection closes: a broken download
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    httpd.body, httpd.ranges, httpd.cut_first, httpd.honour_range = build_zip(), [], False, True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    stopper = threading.Timer(120, httpd.shutdown)  # bounded, even if the test hangs
    stopper.daemon = True
    stopper.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/cats_and_dogs_filtered.zip"
    yield httpd
    stopper.cancel()
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/cats_and_dogs_filtered.zip"


def test_download_unpack_and_verify(server, tmp_path):
    dest = str(tmp_path / "downloads" / "x.zip")
    assert reproduce.download(server.url, dest, wait=0) == dest
    assert open(dest, "rb").read() == server.body and server.ranges == [None]
    assert not os.path.exists(dest + ".part")
    folder = reproduce.unpack(dest, str(tmp_path / "data"))
    assert reproduce.verify(folder, TINY) == folder
    assert sorted(os.listdir(tmp_path / "data")) == ["cats_and_dogs_filtered"]  # no temporary left
    assert reproduce.download(server.url, dest, wait=0) == dest and len(server.ranges) == 1  # kept


def test_a_broken_download_resumes_with_range(server, tmp_path):
    server.cut_first = True
    dest = str(tmp_path / "x.zip")
    reproduce.download(server.url, dest, wait=0)
    half = len(server.body) // 2
    assert server.ranges == [None, f"bytes={half}-"]  # the second request asked for the rest
    assert open(dest, "rb").read() == server.body


def test_a_partial_file_from_an_earlier_run_is_resumed(server, tmp_path):
    dest = str(tmp_path / "x.zip")
    with open(dest + ".part", "wb") as f:
        f.write(server.body[:1000])
    reproduce.download(server.url, dest, wait=0)
    assert server.ranges == ["bytes=1000-"] and open(dest, "rb").read() == server.body


def test_a_server_that_ignores_range_restarts_from_zero(server, tmp_path):
    server.honour_range = False
    dest = str(tmp_path / "x.zip")
    with open(dest + ".part", "wb") as f:
        f.write(b"garbage that must not stay in front of the file")
    reproduce.download(server.url, dest, wait=0)
    assert open(dest, "rb").read() == server.body


def test_offline_fails_with_one_clear_message(tmp_path):
    with pytest.raises(UserError, match="could not download .* needs internet access"):
        reproduce.download(closed_port_url(), str(tmp_path / "x.zip"), wait=0)
    assert not os.listdir(tmp_path)


def test_wrong_counts_and_damaged_zips_are_refused(server, tmp_path):
    dest = reproduce.download(server.url, str(tmp_path / "x.zip"), wait=0)
    folder = reproduce.unpack(dest, str(tmp_path / "data"))
    os.remove(os.path.join(folder, "train", "cats", "cat.0.jpg"))
    with pytest.raises(UserError, match=r"train/cats has 2 \(expected 3 images\)"):
        reproduce.verify(folder, TINY)
    with pytest.raises(UserError, match="test/dogs has no folder"):
        reproduce.verify(folder, {"test": {"dogs": 1}})
    with open(dest, "r+b") as f:  # flip bytes in the middle: a damaged archive
        f.seek(len(server.body) // 2)
        f.write(b"\0" * 64)
    with pytest.raises(UserError, match="damaged .* rerun `make reproduce`"):
        reproduce.unpack(dest, str(tmp_path / "again"))
    assert not os.path.exists(dest)


def test_the_whole_experiment_on_a_tiny_archive(server, tmp_path, make_config, capsys):
    # DATA not told: download; SEED and the cut's settings not told: the record's, in its json
    config = make_config("data/demo").replace(data=None, seed=None, unfreeze=None,
                                              finetune_from=None, cut_storage=None)
    result = reproduce.run(config, url=server.url, downloads=str(tmp_path / "downloads"),
                           data_parent=str(tmp_path / "data"), expected=TINY, retry_wait=0,
                           settings=dict(size=32, batch_size=4, epochs=2, finetune_epochs=1))
    assert result.data == str(tmp_path / "data" / "cats_and_dogs_filtered")
    assert set(result.results) == {"logreg", "dense", "finetuned"}
    # Every model was measured on both splits; the article gives figures for two of them only.
    for model, row in result.results.items():
        assert 0 <= row["validation"] <= 1 and 0 <= row["test"] <= 1, (model, row)
    assert [row["article"] for row in result.results.values()] == [None, 0.95, 0.97]
    saved = artifacts.read_json(result.path, "")
    assert saved["results"] == result.results
    assert saved["config"]["size"] == 32 and saved["config"]["name"] == "cats_and_dogs_filtered"
    assert (saved["config"]["seed"], saved["config"]["finetune_from"]) == (0, "cache")
    assert os.path.exists(os.path.join(os.path.dirname(result.path), artifacts.REPORT))
    out = capsys.readouterr().out
    assert "ours beside the article's" in out and "97.0%" in out and "95.0%" in out
    for row in result.results.values():  # ours are printed beside the article's, on one line
        line = next(line for line in out.splitlines() if line.strip().startswith(row["title"]))
        assert f"{100 * row['validation']:.1f}%" in line and f"{100 * row['test']:.1f}%" in line


def test_the_experiment_offline_stops_before_any_work(tmp_path, make_config):
    with pytest.raises(UserError, match="needs internet access"):
        reproduce.run(make_config("data/demo").replace(data=None), url=closed_port_url(),
                      retry_wait=0, downloads=str(tmp_path / "downloads"),
                      data_parent=str(tmp_path / "data"))
    assert not os.path.exists(tmp_path / "features") and not os.path.exists(tmp_path / "data")


# --------------------------------------------------------------------------------------------
# Bounded: the download, the unpacking, a full disk in the middle
# --------------------------------------------------------------------------------------------

class EndlessBody:
    """A response of zeros without end (or announcing `length`), counting what is read."""

    def __init__(self, length=None):
        self.headers = {} if length is None else {"Content-Length": str(length)}
        self.status, self.read_bytes = 200, 0

    def read(self, n=-1):
        assert n > 0, "a read without a size would never end"
        self.read_bytes += n
        return b"\0" * n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("length", [None, 10 << 20])
def test_a_body_over_the_limit_is_refused_and_not_kept(tmp_path, monkeypatch, length):
    """Without Content-Length the body is read up to the cap and no further; an announced size
    over the cap is refused before a byte is read."""
    monkeypatch.setattr(reproduce, "MAX_DOWNLOAD", 1 << 20)
    body = EndlessBody(length)
    monkeypatch.setattr(reproduce.urllib.request, "urlopen", lambda request, timeout: body)
    dest = str(tmp_path / "x.zip")
    said = "announces 10,485,760 bytes" if length else "sends more than that"
    with pytest.raises(UserError, match=rf"^http://example.invalid/x.zip is not the expected "
                                        rf"archive: it {said}, over the 1 MiB limit .*DATA="):
        reproduce.download("http://example.invalid/x.zip", dest, wait=0)
    assert body.read_bytes <= (1 << 20) + 1 if length is None else body.read_bytes == 0
    assert not os.listdir(tmp_path)  # neither the zip nor a .part


def zip_of_zeros(path, megabytes=4, members=1):
    """A zip bomb in miniature: `megabytes` of zeros in `members` entries, deflated to ~4 KB
    each per megabyte."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(members):
            archive.writestr(f"cats_and_dogs_filtered/train/cats/zeros.{i}.jpg",
                             b"\0" * (megabytes << 20))
    return str(path)


@pytest.mark.parametrize("limit, value, message", [
    ("MAX_UNPACKED", 1 << 20, r"unpacks to 4,194,304 bytes, over the 1 MiB limit \(MAX_UNPACKED\)"),
    ("MAX_MEMBERS", 3, r"has 4 entries, over the limit of 3 \(MAX_MEMBERS\)"),
])
def test_a_zip_bomb_is_refused_in_one_line_before_unpacking(tmp_path, monkeypatch, limit, value,
                                                            message):
    monkeypatch.setattr(reproduce, limit, value)
    zip_path = zip_of_zeros(tmp_path / "bomb.zip", megabytes=1, members=4)
    assert os.path.getsize(zip_path) < 100_000  # 4 MiB of zeros, a few KB zipped
    written = []
    monkeypatch.setattr(reproduce, "open", lambda *a, **k: written.append(a) or open(*a, **k),
                        raising=False)
    with pytest.raises(UserError, match=rf"^\S*bomb.zip is not the expected archive \({message}\) "
                                        r"and was deleted: rerun `make reproduce`"):
        reproduce.unpack(zip_path, str(tmp_path / "data"))
    assert written == []  # refused from the zip's directory, before a byte is unpacked
    assert not os.path.exists(tmp_path / "data")
    assert not os.path.exists(zip_path)


def test_members_larger_than_they_say_stop_at_the_limit_while_unpacking(tmp_path, monkeypatch):
    """The sizes in the zip's directory are the archive's word: the bytes written are counted
    too, whatever a member (or the library reading it) delivers."""
    zip_path = tmp_path / "x.zip"
    zip_path.write_bytes(build_zip())  # declares a few KB
    monkeypatch.setattr(reproduce, "MAX_UNPACKED", 1 << 20)
    monkeypatch.setattr(reproduce.zipfile.ZipFile, "open",
                        lambda archive, member: io.BytesIO(b"\0" * (600 << 10)))
    with pytest.raises(UserError, match=r"x.zip is not the expected archive \(unpacks to more "
                                        r"than the 1 MiB limit \(MAX_UNPACKED\)\) and was deleted"):
        reproduce.unpack(str(zip_path), str(tmp_path / "data"))
    assert os.listdir(tmp_path / "data") == []  # the temporary folder too is gone
    assert not os.path.exists(zip_path)


class FullDisk(io.RawIOBase):
    """A file on a full disk: every write fails as the kernel says so."""

    def writable(self):
        return True

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_unpacking_leaves_nothing_and_is_one_line(server, tmp_path, monkeypatch):
    dest = reproduce.download(server.url, str(tmp_path / "x.zip"), wait=0)
    opened = []

    def filling(path, mode="r", *args, **kwargs):  # the fourth file written finds the disk full
        opened.append(path)
        return FullDisk() if len(opened) == 4 else open(path, mode, *args, **kwargs)

    monkeypatch.setattr(reproduce, "open", filling, raising=False)
    parent = tmp_path / "data"
    with pytest.raises(UserError, match=r"^unpacking \S*x.zip into \S*data failed \(No space left "
                                        r"on device\); nothing was kept: free about 256 MiB "
                                        r"there, then rerun `make reproduce`$"):
        reproduce.unpack(dest, str(parent))
    assert len(opened) == 4  # it did fail in the middle
    assert os.listdir(parent) == []  # no temporary folder, no half dataset
    assert os.path.exists(dest)  # the download was fine: kept for the next run
    monkeypatch.undo()
    folder = reproduce.unpack(dest, str(parent))  # with room again: a clean result
    assert reproduce.verify(folder, TINY) == folder and os.listdir(parent) == [FOLDER]


@pytest.mark.parametrize("name", ["../evil.txt", "/tmp/evil.txt",
                                  "cats_and_dogs_filtered/../../evil.txt"])
def test_an_entry_outside_the_folder_is_refused(tmp_path, name):
    zip_path = tmp_path / "x.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr("cats_and_dogs_filtered/a.jpg", b"a")
        archive.writestr(name, b"evil")
    with pytest.raises(UserError, match=rf"x.zip is damaged \(an entry named '{re.escape(name)}' "
                                        r"would land outside the folder\) and was deleted"):
        reproduce.unpack(str(zip_path), str(tmp_path / "data" / "in"))
    assert os.listdir(tmp_path / "data" / "in") == []
    assert sorted(os.listdir(tmp_path)) == ["data"] and os.listdir(tmp_path / "data") == ["in"]


def test_a_full_disk_while_downloading_is_one_line_and_not_retried(tmp_path, monkeypatch):
    body = EndlessBody(3 << 16)
    monkeypatch.setattr(reproduce.urllib.request, "urlopen", lambda request, timeout: body)
    monkeypatch.setattr(reproduce, "open", lambda *a, **k: FullDisk(), raising=False)
    with pytest.raises(UserError, match=r"^no space left on the disk downloading \S+ into "
                                        r"\S*x.zip.part: free some space, then rerun"):
        reproduce.download("http://example.invalid/x.zip", str(tmp_path / "x.zip"), wait=0)
    assert body.read_bytes == 1 << 16  # one chunk, one try: a full disk is not a broken link
