"""ENGINE=ray on a local Ray cluster: the local engine's cache, bad files listed, a killed worker
and a killed driver survived, and no Ray process left behind by a run that started its own."""
import csv
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np
import pytest
from helpers import make_image_folder

from pipeline import cache, extract
from pipeline.config import Config, UserError
from pipeline.model import backbone

# `make test-ray`, one after another: a cluster takes the cores it is given, so these run apart
# from the parallel `make test`
pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray", reason="ENGINE=ray needs Ray: `make install-ray` "
                                        "(requirements-ray.txt; CI installs it)")
from pipeline.engines import ray_engine  # noqa: E402  (imports Ray)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD = {"horizontal/empty.jpg": b"", "vertical/text.png": b"this is not a picture"}


@pytest.fixture(scope="module")
def cluster():
    """One local cluster of 2 CPUs for the module, joined the way a user joins one from Python:
    runs in this process find it initialised and leave it running."""
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=ray_engine.job_runtime_env(),
             log_to_driver=False, logging_level=logging.WARNING)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """20 tiny images and two files that do not decode."""
    root = make_image_folder(tmp_path_factory.mktemp("ray") / "data", per_class=10)
    for rel, content in BAD.items():
        with open(os.path.join(root, rel), "wb") as f:
            f.write(content)
    return root


def config_of(data, features_root, **changes):
    return Config(**{**dict(data=data, name="tiny", augment=0, weights="none", size=32,
                            batch_size=4, features_root=str(features_root)), **changes})


@pytest.fixture(scope="module")
def local_features(data, tmp_path_factory):
    """ENGINE=local's features, PRECISION=auto as every test here (mixed bfloat16 on a bf16 CPU)."""
    config = config_of(data, tmp_path_factory.mktemp("local"))
    extract.run(config)
    return read_cache(config)


def read_cache(config):
    with cache.FeatureStore(config.features_dir) as store:
        assert len(set(store.sha256)) == len(store)  # one row per image
        return dict(zip(store.paths, store.read(np.arange(len(store)))))


def assert_same_features(config, expected):
    found = read_cache(config)
    assert found.keys() == expected.keys()
    for path in expected:
        np.testing.assert_array_equal(found[path], expected[path])


def segment_files(config):
    """The complete segments on disk (not the temporary files of those being written)."""
    return {os.path.relpath(os.path.join(folder, name), config.features_dir)
            for folder, _, names in os.walk(os.path.join(config.features_dir, "segments"))
            for name in names if name.startswith("seg-") and name.endswith(".h5")}


@pytest.mark.parametrize("nodes, workers, plan", [
    ([{"CPU": 2}], 0, (1, 2, 0)),                              # one actor per node-sized share
    ([{"CPU": 2}], 2, (2, 1, 0)),                              # WORKERS split the CPUs
    ([{"CPU": 16}, {"CPU": 8}], 0, (3, 8, 0)),                 # the smallest node sets the share
    ([{"CPU": 16, "GPU": 4}, {"CPU": 8}], 0, (4, 4, 1)),       # one actor per GPU
    ([{"CPU": 16, "GPU": 4}, {"CPU": 32, "GPU": 4}], 2, (2, 4, 1)),
])
def test_workers_are_planned_from_the_cluster(nodes, workers, plan):
    assert ray_engine.plan_workers(nodes, workers) == plan


@pytest.mark.parametrize("nodes, workers, message", [
    ([{"CPU": 16, "GPU": 4}], 5, "WORKERS=5, but the Ray cluster has 4 GPU"),
    ([{"CPU": 2}], 3, "WORKERS=3, but the Ray cluster has 2 CPUs"),
    ([{"memory": 1e9}], 0, "has no CPU"),
])
def test_impossible_workers_are_refused(nodes, workers, message):
    with pytest.raises(UserError, match=message):
        ray_engine.plan_workers(nodes, workers)


@pytest.mark.parametrize("images, workers, row_bytes, rows", [
    (20, 1, 2048, 10),                 # two batches per worker at least
    (1_000_000, 8, 16384, 4096),       # SIZE=150 float16: cache.COMPACT_BELOW
    (1_000_000, 8, 2 * 2**20, 64),     # SIZE=1024 float32: capped by cache.GROUP_BYTES
])
def test_segments_hold_thousands_of_rows_within_the_memory_cap(images, workers, row_bytes, rows):
    assert ray_engine.segment_rows(images, workers, row_bytes) == rows


def test_ray_gives_the_local_engines_features_and_skipped_files(cluster, data, local_features,
                                                                tmp_path):
    config = config_of(data, tmp_path, engine="ray", workers=2)
    result = extract.run(config)
    assert (result.rows, result.new, result.skipped) == (20, 20, 2)
    # PRECISION=auto as the workers resolve it: here, on this machine's CPU, as the driver would
    assert result.identity["precision"] == backbone.resolve_precision("auto")
    assert_same_features(config, local_features)
    with open(os.path.join(config.features_dir, "skipped.csv")) as f:
        reasons = {row["path"]: row["reason"] for row in csv.DictReader(f)}
    assert reasons.keys() == BAD.keys()
    assert reasons["horizontal/empty.jpg"] == "empty file (0 bytes)"
    assert extract.run(config).new == 0  # reused, and bad files are not retried


def read_every_row(config):
    """path -> [its features, its cut's activations, then each view of both]: all that extract
    computed for it."""
    with cache.FeatureStore(config.features_dir) as store:
        rows = np.arange(len(store))
        out = {path: [store.read([row])[0], store.read([row], "cut_features")[0]]
               for path, row in zip(store.paths, rows)}
        for row in store.rows("train").tolist():
            for view in range(1, store.views + 1):
                out[store.paths[row]] += [store.read_views([row], [view])[0],
                                          store.read_views([row], [view], "cut_")[0]]
    return out


def test_ray_computes_the_views_and_the_cut_bit_for_bit_as_the_local_engine(cluster, data,
                                                                           tmp_path):
    local = config_of(data, tmp_path / "local", augment=2)
    on_ray = config_of(data, tmp_path / "ray", augment=2, engine="ray", workers=2)
    assert extract.run(local).cut == extract.run(on_ray).cut == "block4_pool"
    expected, found = read_every_row(local), read_every_row(on_ray)
    assert found.keys() == expected.keys()
    assert {len(arrays) for arrays in found.values()} == {2, 6}  # views of training rows only
    for path, arrays in expected.items():
        for a, b in zip(arrays, found[path], strict=True):
            np.testing.assert_array_equal(a, b)
    assert extract.run(on_ray).new_views == 0


def test_a_worker_killed_after_writing_its_segment_leaves_no_duplicate(
        cluster, data, local_features, tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv(ray_engine.KILL_ONCE, str(marker))
    config = config_of(data, tmp_path, engine="ray", workers=1)
    result = extract.run(config)
    assert marker.exists()  # an actor did die by SIGKILL, after writing a segment
    assert (result.rows, result.new) == (20, 20)
    assert_same_features(config, local_features)  # read_cache: one row per image
    with h5py.File(result.features_path, "r") as f:
        referenced = set(f["segments"].asstr()[:])
    assert segment_files(config) == referenced  # the killed attempt's segment was removed


def test_a_killed_driver_resumes_from_every_segment_written(cluster, data, local_features,
                                                            tmp_path):
    config = config_of(data, tmp_path, engine="ray", workers=1)
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "extract", "--data", data, "--name", "tiny",
         "--weights", "none", "--size", "32", "--batch-size", "4", "--engine", "ray",
         "--workers", "1", "--ray-address", cluster, "--augment", "0",
         "--features-root", str(tmp_path)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and driver.poll() is None and not segment_files(config):
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert not os.path.exists(os.path.join(config.features_dir, cache.MASTER))
    identity = backbone.feature_identity(backbone.resolve_weights("none"), 32,
                                         backbone.resolve_precision("auto"))
    written = len(cache.inventory(config.features_dir, backbone.identity_id(identity)))
    assert written > 0  # a segment at least

    resumed = extract.run(config)
    assert resumed.reused >= written and resumed.new + resumed.reused == 20
    assert_same_features(config, local_features)


def test_a_failed_run_that_started_its_own_cluster_leaves_no_ray_process(data, tmp_path):
    """Without RAY_ADDRESS a run starts a cluster (here to resolve PRECISION=auto on a worker
    and to extract), and stops it when it fails (here: a class whose only image does not
    decode, found once the cluster has run). Its processes are found by the RAY_TMPDIR they
    inherit. (A run refused by another extract's lock now stops before it starts a cluster.)"""
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    (broken / "unreadable").mkdir()
    (broken / "unreadable" / "only.jpg").write_bytes(b"not an image")
    try:
        run = subprocess.run(
            [sys.executable, "-m", "pipeline", "extract", "--data", str(broken), "--name",
             "tiny", "--weights", "none", "--size", "32", "--engine", "ray", "--features-root",
             str(tmp_path / "features")], cwd=ROOT, env={**env, "RAY_TMPDIR": ray_tmp},
            capture_output=True, text=True, timeout=300)
        assert run.returncode == 2
        assert "class 'unreadable' has no readable image" in run.stderr.strip().splitlines()[-1]
        assert os.listdir(ray_tmp)  # the run did start a cluster there
        deadline = time.time() + 30
        while processes_with(f"RAY_TMPDIR={ray_tmp}") and time.time() < deadline:
            time.sleep(0.5)
        assert processes_with(f"RAY_TMPDIR={ray_tmp}") == []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def processes_with(variable):
    """The pids of the live (not zombie) processes whose environment holds `variable`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if variable.encode() in environ and not zombie:
            found.append(int(pid))
    return found
