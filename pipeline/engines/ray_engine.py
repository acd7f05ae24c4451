"""ENGINE=ray: hashing and feature extraction on a Ray cluster, for data sets that outgrow one
machine.

extract.py still decides everything: discovery, the identity, the inventory of segments, the
to-do list, compaction and features.h5. This module does the work that grows with the images:

* `sha256_of`: files the last run did not see are hashed in Ray tasks, HASH_FILES_PER_TASK each;
* `resolve_precision`: PRECISION=auto as a worker resolves it, on the device it extracts on;
* `compute`: extract's jobs (pipeline.engines.featurize: an image and the rows it lacks) go
  through Ray Data, `from_items` -> `map_batches` on a pool of `Extractor` actors. Each builds the
  featurizer once (the same code as ENGINE=local: the same numbers), writes one segment per target
  and batch of thousands of rows straight into features/<NAME>/segments/, and returns only (key,
  target, segment, row, rows, reason): activations never pass through the object store.

Every node must see DATA, features/<NAME>/ and the weights file at the same paths (a shared file
system); the code reaches the workers through `runtime_env` (py_modules).

Crash safety is the cache's: segments are immutable and renamed into place whole. A killed actor
is restarted by Ray Data and its batch retried (Ray Data's defaults: without limit; the pixel
budget, images.MAX_PIXELS, refuses the files that could kill a decoder every time). A retried batch
may write its segment a second time: the driver keeps exactly one (segment, row) per image, the
last result it receives, and extract's `cache.remove_unreferenced` deletes the orphan once
features.h5 is written. A killed driver loses the batches in flight: the next run's inventory
finds every segment written.
"""
import contextlib
import json
import logging
import math
import os
import signal

import numpy as np
from tqdm import tqdm

from .. import cache
from ..config import UserError
from ..fs import artifacts

try:
    import ray
    import ray.data
except ImportError:  # pragma: no cover - the message is the point
    raise UserError("ENGINE=ray needs Ray: `pip install -r requirements-ray.txt` (`make extract "
                    "ENGINE=ray` installs it into .venv)") from None

HASH_FILES_PER_TASK = 1000
RETRIES = 3              # of a hashing task whose worker died
# Environment the workers need from the driver's: the Keras backend (BACKEND), the
# oneDNN choice that features are reproduced with, quiet logs, and the one test hook.
KILL_ONCE = "PIPELINE_TEST_KILL_WORKER_ONCE"
FORWARDED_ENV = ("KERAS_BACKEND", "KERAS_HOME", "TF_ENABLE_ONEDNN_OPTS", "TF_CPP_MIN_LOG_LEVEL",
                 KILL_ONCE)


class RayEngine:
    """extract's engine on Ray. Connects on first use: to the cluster this process already joined,
    to RAY_ADDRESS, or to a local cluster started here and shut down on exit, also on failure."""

    def __init__(self, config):
        self.config = config
        self.connected = False   # this engine called ray.init, so it calls ray.shutdown
        # per task and actor (Ray merges it with the job's, which ships the code)
        self.runtime_env = {"env_vars": {k: os.environ[k] for k in FORWARDED_ENV
                                         if k in os.environ}}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.connected:  # a cluster started here stops with it: no process outlives the run
            ray.shutdown()
            self.connected = False

    def _connect(self):
        if ray.is_initialized():  # joined by the caller (a notebook, the tests): theirs to end
            return
        address = self.config.ray_address or os.environ.get("RAY_ADDRESS", "")
        # the workers' output (TensorFlow's start-up lines) stays in Ray's logs; their errors
        # reach this process as exceptions
        options = dict(runtime_env=job_runtime_env(), logging_level=logging.WARNING,
                       log_to_driver=False)
        if address:
            ray.init(address=address, **options)
        else:
            ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, **options)
        self.connected = True

    def _plan(self):
        self._connect()
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        return plan_workers(nodes, self.config.workers)

    def resolve_precision(self, precision, entry=None):
        if precision != "auto":
            from ..model import backbone
            return backbone.resolve_precision(precision)  # a fixed choice: no device involved
        *_, gpus = self._plan()
        probe = ray.remote(_precision_here).options(num_cpus=1, num_gpus=gpus,
                                                    runtime_env=self.runtime_env)
        with _worker_errors():
            return ray.get(probe.remote(precision, entry.name if entry else None))

    def sha256_of(self, paths):
        if not paths:
            return []
        self._connect()
        task = ray.remote(_sha256_many).options(num_cpus=1, max_retries=RETRIES,
                                                runtime_env=self.runtime_env)
        chunks = [paths[i:i + HASH_FILES_PER_TASK]
                  for i in range(0, len(paths), HASH_FILES_PER_TASK)]
        refs = [task.remote(chunk) for chunk in chunks]
        hashes = []
        with tqdm(total=len(paths), desc="hashing (ray)", unit="file", leave=False,
                  disable=len(paths) < 2000) as progress:
            for ref, chunk in zip(refs, chunks):  # in order: hashes line up with paths
                with _worker_errors():
                    hashes += ray.get(ref)
                progress.update(len(chunk))
        return hashes

    def compute(self, config, weights, identity, targets, jobs, known):
        """extract's local compute on the cluster: updates `known` (one index per target) in
        place with one (segment, row, rows) per row computed and returns {sha: reason} for the
        images that could not be decoded."""
        workers, cpus, gpus = self._plan()
        inputs = sum(len(job.inputs) for job in jobs)
        row_bytes = max(int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize for t in targets)
        per_input = segment_rows(inputs, workers, row_bytes)
        # a Ray batch is whole images, about per_input rows (an image brings all its views)
        per_batch = max(1, per_input * len(jobs) // max(inputs, 1))
        items = [{"sha256": job.sha256, "path": os.path.abspath(job.path),
                  "inputs": json.dumps(job.inputs)} for job in jobs]
        results = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / per_batch))
        results = results.map_batches(
            Extractor, batch_size=per_batch, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus, num_gpus=gpus,
            fn_constructor_kwargs=dict(
                features_dir=os.path.abspath(config.features_dir), identity=identity.as_dict(),
                targets=[vars(t) for t in targets], weights=vars(weights), seed=config.seed,
                batch_size=config.batch_size, threads=cpus),
            runtime_env=self.runtime_env)  # a killed actor is restarted, its batch retried
        unreadable = {}
        print(f"extract {config.dataset_name}: {len(items)} images ({inputs} rows) on Ray, "
              f"{workers} workers of {f'1 GPU and {cpus}' if gpus else cpus} CPU(s), about "
              f"{per_input} rows per segment")
        with _worker_errors():
            for out in results.iter_batches(batch_size=None, batch_format="numpy"):
                for sha, key, target, segment, row, n, reason in zip(
                        out["sha256"], out["key"], out["target"], out["segment"], out["row"],
                        out["rows"], out["reason"]):
                    if reason:
                        unreadable[str(sha)] = str(reason)
                    else:  # one (segment, row) per row: a retried batch's result replaces any
                        known[int(target)][str(key)] = (str(segment), int(row), int(n))
        return unreadable


def job_runtime_env():
    """The `runtime_env` that ships this package to every worker of the job, for ray.init (Ray
    uploads a local folder only at the job level): pass it too when joining Ray yourself."""
    return {"py_modules": [os.path.dirname(os.path.abspath(__file__))],
            "excludes": ["__pycache__"]}


def plan_workers(nodes, requested):
    """(actors, CPUs per actor, GPUs per actor) for the live nodes' resources ({"CPU": .., "GPU":
    ..} each). With GPUs: one actor per GPU, each with the CPUs of its node's GPU share to decode.
    Without: one actor per share of the smallest node's size (so one fits on every node), or
    WORKERS actors splitting the CPUs."""
    gpu_nodes = [node for node in nodes if node.get("GPU", 0) >= 1]
    if gpu_nodes:
        gpus = sum(int(node["GPU"]) for node in gpu_nodes)
        if requested > gpus:
            raise UserError(f"WORKERS={requested}, but the Ray cluster has {gpus} GPU(s) and each "
                            f"worker takes one: use WORKERS={gpus} or less (0: one per GPU)")
        share = min(int(node.get("CPU", 0) // node["GPU"]) for node in gpu_nodes)
        return requested or gpus, max(1, share), 1
    cpus = [int(node.get("CPU", 0)) for node in nodes if node.get("CPU", 0) >= 1]
    if not cpus:
        raise UserError("the Ray cluster has no CPU to extract with: check RAY_ADDRESS")
    if not requested:
        share = min(cpus)
        return sum(c // share for c in cpus), share, 0
    if requested > sum(cpus):
        raise UserError(f"WORKERS={requested}, but the Ray cluster has {sum(cpus)} CPUs and "
                        f"each worker needs one: use WORKERS={sum(cpus)} or less (0: automatic)")
    return requested, max(1, min(min(cpus), sum(cpus) // requested)), 0


def segment_rows(images, workers, row_bytes):
    """Rows per segment, which is one Ray Data batch: cache.COMPACT_BELOW, so that compaction
    leaves the segments alone, or fewer when a segment would pass cache.GROUP_BYTES (an actor holds
    one in memory) or when fewer would leave a worker idle (two batches per worker at least)."""
    largest = cache.rows_per_segment(row_bytes)
    return max(1, min(largest, math.ceil(images / (2 * workers))))


@contextlib.contextmanager
def _worker_errors():
    """A UserError raised on a worker, re-raised here as the one line it is: Ray wraps it in
    exceptions of its own, with the worker's traceback in their text."""
    try:
        yield
    except Exception as error:
        user = _user_error(error)
        if user is None:
            raise
        raise UserError(str(user)) from None


def _user_error(error):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, UserError) and not isinstance(error, ray.exceptions.RayError):
            return error
        cause = getattr(error, "cause", None)
        error = cause if isinstance(cause, BaseException) else error.__cause__
    return None


# --------------------------------------------------------------------------------------------
# What runs on the workers
# --------------------------------------------------------------------------------------------

def _sha256_many(paths):
    return [artifacts.file_sha256(path) for path in paths]


def _precision_here(precision, backbone_name=None):
    from ..data import backbones
    from ..model import backbone
    return backbone.resolve_precision(precision, backbones.get(backbone_name))


class Extractor:
    """One Ray Data actor: the featurizer (pipeline.engines.featurize) built once; each call turns
    a batch of jobs into one segment per target and returns where each row went, or why its image
    could not be decoded."""
    def __init__(self, features_dir, identity, targets, weights, seed, batch_size, threads):
        _limit_threads(threads)  # before the framework runs its first operation
        from ..model import backbone
        from . import featurize
        if not os.path.isdir(features_dir):
            raise UserError(f"a Ray worker on {os.uname().nodename} cannot see {features_dir}: "
                            "features/ and DATA must be on a file system every node shares")
        self.features_dir = features_dir
        identity = backbone.FeatureIdentity.read(identity)
        self.featurizer = featurize.Featurizer(
            _weights_here(weights, identity.entry), identity,
            [featurize.Target(**{**t, "shape": tuple(t["shape"])}) for t in targets], seed,
            batch_size, threads)

    def __call__(self, batch):
        from . import featurize
        jobs = [featurize.Job(str(sha), str(path), tuple(tuple(i) for i in json.loads(str(spec))))
                for sha, path, spec in zip(batch["sha256"], batch["path"], batch["inputs"])]
        self.featurizer.unreadable = {}
        found = [([], []) for _ in self.featurizer.targets]  # per target: keys, row arrays
        for rows in self.featurizer.batches(jobs):
            for number, (keys, parts) in enumerate(found):
                more, activations = rows.rows_for(number)
                keys += more
                parts.append(activations)
        out = {name: [] for name in ("sha256", "key", "target", "segment", "row", "rows",
                                     "reason")}
        for number, (target, (keys, parts)) in enumerate(zip(self.featurizer.targets, found)):
            if keys:
                segment = cache.write_segment(self.features_dir, target.identity_id, keys,
                                              np.concatenate(parts))
                for row, key in enumerate(keys):
                    for name, value in zip(out, ("", key, number, segment, row, len(keys), "")):
                        out[name].append(value)
        _die_once_for_tests()
        for sha, reason in self.featurizer.unreadable.items():
            for name, value in zip(out, (sha, "", -1, "", -1, 0, reason)):
                out[name].append(value)
        return {"sha256": np.array(out["sha256"], dtype=object),
                "key": np.array(out["key"], dtype=object),
                "target": np.array(out["target"], np.int64),
                "segment": np.array(out["segment"], dtype=object),
                "row": np.array(out["row"], np.int64), "rows": np.array(out["rows"], np.int64),
                "reason": np.array(out["reason"], dtype=object)}


def _limit_threads(threads):
    """The framework's thread pools to this actor's CPU share: TensorFlow sizes them by the
    machine's cores and ignores Ray's num_cpus, so two actors on one node would each run a thread
    per core and fight over them. One whole GPU per actor, its memory taken as needed."""
    import keras
    name = keras.backend.backend()
    if name == "tensorflow":
        import tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    elif name == "torch":
        import torch
        torch.set_num_threads(threads)
    elif name == "jax":  # read when JAX starts its backend, at the first operation
        os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen"
                                   f"=false intra_op_parallelism_threads={threads}").strip()
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _weights_here(fields, entry):
    """The driver's weights of the backbone `entry` on this node: a worker on another node has
    its own Keras cache."""
    from ..model import backbone
    weights = backbone.Weights(**fields)
    if not weights.path or os.path.isfile(weights.path):
        return weights
    here = backbone.resolve_weights(weights.spec, entry)
    if here.fingerprint != weights.fingerprint:
        raise UserError(f"the weights on {os.uname().nodename} ({here.path}) are not the driver's "
                        f"({weights.path}): put the same file on every node")
    return here


def _die_once_for_tests():
    """Tests only (tests/test_ray.py): with PIPELINE_TEST_KILL_WORKER_ONCE=<marker file>, the
    first actor to write a segment dies by SIGKILL before returning its rows, as a worker lost to
    the OOM killer would: the batch is retried and writes its segment a second time."""
    marker = os.environ.get(KILL_ONCE)
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
