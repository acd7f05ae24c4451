"""The careless user and the attacker: every input that once destroyed data, hung a run, ran
code or trained silently on garbage. Each test checks three things: what happened to the files
outside features/<NAME> and models/<NAME> (nothing), the outcome, and the one-line message."""
import os
import pickle
import shlex
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
from helpers import make_image_folder
from trained_run import trained_run_copy

from pipeline import __main__ as cli
from pipeline import evaluate, predict, train_head
from pipeline.config import UserError
from pipeline.fs import artifacts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snapshot(folder, leave_out=()):
    """Every file and folder below `folder` with its size and mtime, except those below the
    paths in `leave_out` (the outputs a run is allowed to write)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in leave_out]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            stat = os.lstat(path)
            found[path] = (stat.st_size, stat.st_mtime_ns)
    return found


def cli_in(folder, *args):
    """`python -m pipeline ARGS` run in `folder`: (exit code, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout, done.stderr


def assert_one_line_error(code, err, pattern):
    import re
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), lines[0]


# --------------------------------------------------------------------------------------------
# 2, 3, 11: names and settings are refused before any work, in one line
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["..", "../../x", "/tmp/v", ".", ".hidden", "*", "x; echo hi",
                                  "a\nb", "x" * 101])
def test_a_name_that_is_not_one_folder_is_refused_and_writes_nothing(tmp_path, name):
    make_image_folder(tmp_path / "work" / "data", per_class=2)
    before = snapshot(tmp_path)
    code, _, err = cli_in(tmp_path / "work", "extract", "--data", "data", "--name", name,
                          "--weights", "none", "--size", "32")
    assert_one_line_error(code, err, r"NAME=.* is not a dataset name: .*pass NAME=")
    assert snapshot(tmp_path) == before  # not even features/ or models/


def test_a_data_folder_without_a_usable_name_asks_for_one(tmp_path):
    make_image_folder(tmp_path / "data", per_class=2)
    before = snapshot(tmp_path)
    code, _, err = cli_in(tmp_path / "data", "extract", "--data", ".", "--weights", "none")
    assert_one_line_error(code, err, r"DATA='\.' \(its folder name\) is not a dataset name")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("args, pattern", [
    (["--size", "100000"], r"SIZE=100000 is out of range: use a whole number from 32 to 1024"),
    (["--size", "16"], r"SIZE=16 is out of range"),
    (["--size", "1024", "--batch-size", "1024"],
     r"SIZE=1024 with BATCH_SIZE=1024 needs about \d+\.\d GB.*use BATCH_SIZE=\d+ or less"),
    (["--batch-size", "0"], r"BATCH_SIZE=0 is out of range: use a whole number from 1"),
    (["--batch-size", "-3"], r"BATCH_SIZE=-3 is out of range"),
    (["--lr", "0"], r"LR=0.0 is not a learning rate: use a small positive number"),
    (["--lr=-1e-5"], r"LR=-1e-05 is not a learning rate"),
    (["--size", "big"], r"--size 'big' is not a whole number: see `python -m pipeline --help`"),
    (["--lr", "nan"], r"LR=nan is not a learning rate"),
    (["--split", "100/0/0"], r"SPLIT='100/0/0' is not .* with a train and a validation share"),
    (["--split", "80/20"], r"SPLIT='80/20' is not train/validation/test percentages"),
    (["--epochs", "0"], r"EPOCHS=0 is out of range"),
    (["--seed", "-1"], r"SEED=-1 is out of range"),
    (["--head", "deep"], r"HEAD='deep' is not one of dense, logreg, both"),
    (["--precision", "int4"], r"PRECISION='int4' is not one of auto"),
])
def test_bad_settings_are_one_line_before_any_work(tmp_path, args, pattern):
    make_image_folder(tmp_path / "data", per_class=2)
    before = snapshot(tmp_path)
    code, _, err = cli_in(tmp_path, "extract", "--data", "data", "--weights", "none", *args)
    assert_one_line_error(code, err, pattern)
    assert snapshot(tmp_path) == before


def test_a_negative_learning_rate_never_reaches_fine_tuning(tmp_path, capsys):
    """LR<=0 was accepted: the loss reached 6.7e13 and finetune exited 0."""
    code = cli.main(["finetune", "--name", "x", "--lr=-0.001",
                     "--features-root", str(tmp_path / "f"), "--models-root", str(tmp_path / "m")])
    assert code == 2 and "LR=-0.001 is not a learning rate" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "m")


# --------------------------------------------------------------------------------------------
# 10: the Makefile passes every value as one word, exactly as typed
# --------------------------------------------------------------------------------------------

def make_in_repo(*args, dry_run=False):
    """`make ARGS` in the repository, with this interpreter and no install step."""
    command = ["make", "-s", "-C", ROOT, *(["-n"] if dry_run else []), *args,
               f"PYTHON={sys.executable}", "STAMP="]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_make_runs_no_command_hidden_in_a_variable(tmp_path):
    before = snapshot(ROOT, leave_out={os.path.join(ROOT, ".git")})
    done = make_in_repo("extract", f"DATA={tmp_path}", "NAME=x; echo INJECTED #",
                        "WEIGHTS=$(shell touch INJECTED_BY_MAKE)", "SIZE=32")
    assert done.returncode != 0
    assert "INJECTED" not in done.stdout.splitlines()  # the echo never ran
    assert "error: NAME='x; echo INJECTED #' is not a dataset name" in done.stderr
    assert snapshot(ROOT, leave_out={os.path.join(ROOT, ".git")}) == before


def test_a_stage_without_data_makes_no_demo_data_and_names_data_and_name(tmp_path, capsys):
    """`make train-head NAME=x` generated 300 demo pictures in data/demo: only `make demo` and
    `make demo-data` write demo data; a bare stage reads NAME's cache or says what it needs."""
    demo = f"DEMO={tmp_path / 'demo'}"  # a demo folder not generated yet
    for stage in ("extract", "train-head", "finetune"):
        assert "demo-data" not in make_in_repo(stage, "NAME=x", demo, dry_run=True).stdout
    assert "demo-data" in make_in_repo("demo-data", demo, dry_run=True).stdout
    code = cli.main(["train-head", "--name", "x", "--features-root", str(tmp_path / "f"),
                     "--models-root", str(tmp_path / "m")])
    assert code == 2 and capsys.readouterr().err.startswith(
        f"error: no feature cache at {tmp_path / 'f' / 'x' / 'features.h5'}: run `make extract "
        "DATA=<folder> NAME=x` first")


@pytest.mark.parametrize("stage", ["train-head", "finetune", "evaluate", "audit", "report"])
def test_a_stage_refused_for_want_of_a_cache_writes_nothing(tmp_path, capsys, stage):
    """The refusal comes before the stage takes models/<NAME>'s lock, which would make the
    folder (and its .lock) for a dataset that does not exist."""
    code = cli.main([stage, "--name", "x", "--features-root", str(tmp_path / "f"),
                     "--models-root", str(tmp_path / "m")])
    assert code == 2 and "error: no feature cache at" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("variable, option, value", [
    ("DATA", "--data", "my photos/2023 trip"),
    ("NAME", "--name", "trip[2023]"),
    ("LABELS", "--labels", "it's labels.csv"),
    ("LABEL_COLUMNS", "--label-columns", "file,species"),
    ("WEIGHTS", "--weights", "$(shell echo x) $$HOME `id`"),
])
def test_make_passes_each_value_as_one_word(variable, option, value):
    done = make_in_repo("extract", f"{variable}={value}", dry_run=True)
    command = next(line for line in done.stdout.splitlines() if "-m pipeline extract" in line)
    assert f"{option}={value}" in shlex.split(command)


# --------------------------------------------------------------------------------------------
# 4: nothing we load can run code
# --------------------------------------------------------------------------------------------

class _RunsCode:
    """Unpickling this calls os.system: what a logreg.joblib placed in models/<NAME> could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_run_copy(tmp_path_factory, tmp_path_factory.mktemp("hostile"))


def copy_of(config, tmp_path):
    for root in ("features_root", "models_root"):
        shutil.copytree(getattr(config, root), tmp_path / root)
    return config.replace(features_root=str(tmp_path / "features_root"),
                          models_root=str(tmp_path / "models_root"))


LEGACY = "logreg.joblib is a pickle from an earlier version and is not loaded"


@pytest.mark.parametrize("stage", ["predict-auto", "predict-logreg", "evaluate"])
def test_a_pickle_in_the_models_folder_is_never_loaded(trained, tmp_path, capsys, stage):
    config = copy_of(trained, tmp_path)
    marker = str(tmp_path / "code_ran")
    os.remove(artifacts.path(config, artifacts.LOGREG))
    with open(artifacts.path(config, artifacts.LEGACY_LOGREG), "wb") as f:
        pickle.dump({"model": _RunsCode(marker)}, f)
    if stage == "predict-logreg":
        with pytest.raises(UserError, match=LEGACY):
            predict.run(config.replace(images=config.data, model="logreg"))
    else:
        if stage == "evaluate":
            assert set(evaluate.run(config).accuracy) == {"dense", "finetuned"}
        else:
            assert predict.run(config.replace(images=config.data)).model in ("dense", "finetuned")
        assert LEGACY in capsys.readouterr().out  # said, in one line, and passed over
    assert not os.path.exists(marker)


def test_a_logreg_file_holding_objects_is_refused(trained, tmp_path):
    """Even with metrics that vouch for it, an .npz that needs pickle to load is refused."""
    config = copy_of(trained, tmp_path)
    path = artifacts.path(config, artifacts.LOGREG)
    with open(path, "wb") as f:
        np.savez(f, metadata=np.array([_RunsCode(str(tmp_path / "code_ran"))], dtype=object))
    vouch_for(config, "logreg", path)
    with pytest.raises(UserError, match=r"logreg.npz cannot be loaded safely .*make train-head"):
        evaluate.run(config)
    assert not os.path.exists(tmp_path / "code_ran")


def test_a_keras_file_with_code_in_it_loads_only_in_safe_mode(trained, tmp_path):
    """A head with a Lambda layer (Python bytecode in the file) is refused by safe mode."""
    config = copy_of(trained, tmp_path)
    marker = str(tmp_path / "code_ran")
    inputs = keras.Input((1, 1, 512))
    outputs = keras.layers.Lambda(lambda x: (open(marker, "w"), x)[1][..., :1])(inputs)
    path = artifacts.path(config, artifacts.HEAD)
    keras.Model(inputs, outputs).save(path)
    os.remove(marker)  # building the model called the lambda once, here in the test
    vouch_for(config, "dense", path)
    with pytest.raises(UserError, match=r"head.keras cannot be loaded safely .*make train-head"):
        predict.run(config.replace(images=config.data, model="dense"))
    assert not os.path.exists(marker)


def vouch_for(config, entry, path):
    """What an attacker who can also edit head_metrics.json would write."""
    metrics_path = artifacts.path(config, artifacts.HEAD_METRICS)
    metrics = artifacts.read_json(metrics_path, "")
    metrics["models"][entry]["file_sha256"] = artifacts.file_sha256(path)
    artifacts.write_json(metrics_path, metrics)


# --------------------------------------------------------------------------------------------
# 9: every output comes from the run its metrics describe
# --------------------------------------------------------------------------------------------

def test_an_interrupted_train_head_leaves_the_last_run_whole(trained, tmp_path, monkeypatch,
                                                             capsys):
    """A kill after logreg was fitted used to leave a new logreg.npz and head_metrics.json
    beside the previous run's head.keras, which was then refused everywhere. train-head's files
    are one commit: killed before it, the last run's files stand, each described by its
    metrics."""
    config = copy_of(trained, tmp_path)
    names = (artifacts.LOGREG, artifacts.HEAD, artifacts.HEAD_METRICS)
    before = {name: open(artifacts.path(config, name), "rb").read() for name in names}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_head, "train_dense", killed)
    with pytest.raises(KeyboardInterrupt):
        train_head.run(config.replace(seed=1))
    monkeypatch.undo()
    assert {name: open(artifacts.path(config, name), "rb").read() for name in names} == before

    capsys.readouterr()
    result = evaluate.run(config)
    assert set(result.accuracy) == {"logreg", "dense", "finetuned"}
    assert "is not the file its metrics describe" not in capsys.readouterr().out


def test_the_makefile_passes_every_setting_and_only_those():
    """One list in the Makefile, one Config in config.py: they must not drift apart."""
    with open(os.path.join(ROOT, "Makefile")) as f:
        text = f.read().replace("\\\n", " ")
    listed = next(line for line in text.splitlines() if line.startswith("SETTINGS :="))
    from pipeline.config import MAKE_VARIABLES
    expected = {name.upper() for name in MAKE_VARIABLES} - {"DATASETS"}  # passed apart
    assert set(listed.split(":=")[1].split()) == expected


def test_fine_tuning_a_name_with_brackets_leaves_the_dataset_it_would_glob_alone(trained,
                                                                                 tmp_path):
    """Fine-tuning's clean-up of old best weights globbed models/<NAME>/...: NAME='tin[y]'
    matched models/tiny and deleted that dataset's files."""
    config = copy_of(trained, tmp_path)
    bracketed = config.replace(name="tin[y]", fresh=True)
    for root in (config.features_root, config.models_root):
        shutil.copytree(os.path.join(root, "tiny"), os.path.join(root, "tin[y]"))
    other = os.path.join(config.models_root, "tiny")
    decoy = os.path.join(other, artifacts.FINETUNE_BACKUP, "best-epoch-7.npz")
    os.makedirs(os.path.dirname(decoy), exist_ok=True)
    np.savez(decoy, np.zeros(1))
    before = snapshot(other)
    from pipeline import finetune
    assert finetune.run(bracketed).epochs == 1
    assert snapshot(other) == before and os.path.exists(decoy)
