"""`make reproduce`: download with resume, unpack, verify, against a local HTTP server.

The server listens on 127.0.0.1 only, runs in a thread, serves one small zip that the test builds,
and is shut down by the fixture (or by a timer, whatever happens to the test)."""
import http.server
import io
import os
import socket
import threading
import zipfile

import numpy as np
import pytest
from PIL import Image

from pipeline import artifacts, reproduce
from pipeline.config import UserError

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
    config = make_config("data/demo")  # DATA left at its default: download
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
    assert os.path.exists(os.path.join(os.path.dirname(result.path), artifacts.REPORT))
    out = capsys.readouterr().out
    assert "ours beside the article's" in out and "97.0%" in out and "95.0%" in out
    for row in result.results.values():  # ours are printed beside the article's, on one line
        line = next(line for line in out.splitlines() if line.strip().startswith(row["title"]))
        assert f"{100 * row['validation']:.1f}%" in line and f"{100 * row['test']:.1f}%" in line


def test_the_experiment_offline_stops_before_any_work(tmp_path, make_config):
    with pytest.raises(UserError, match="needs internet access"):
        reproduce.run(make_config("data/demo"), url=closed_port_url(), retry_wait=0,
                      downloads=str(tmp_path / "downloads"), data_parent=str(tmp_path / "data"))
    assert not os.path.exists(tmp_path / "features") and not os.path.exists(tmp_path / "data")
