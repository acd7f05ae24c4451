"""What lies inside models/<NAME> is untrusted: no stage writes, truncates or deletes through a
link planted there, a second writer stops with one line, and what report and predict read back
(evaluation.json, the metrics) is checked before it is used or shown."""
import importlib.util
import os
import re
import shutil
import stat
import threading

import keras
import pytest
from helpers import edit_json

from pipeline import audit, evaluate, extract, finetune, predict, report, train_head
from pipeline.config import UserError
from pipeline.fs import artifacts, files, lock
from pipeline.model import logs, registry

VICTIM = b"a file of the user's, outside features/ and models/\n"


TINY = dict(per_class=10, split="40/30/30", epochs=1, name="tiny")  # 20 images: 8/6/6


@pytest.fixture
def extracted(prepared, tmp_path):
    """A small extracted dataset (WEIGHTS=none, SIZE=32) and a victim file beside it."""
    (tmp_path / "victim.txt").write_bytes(VICTIM)
    return prepared((extract.run,), **TINY)


def logs_written():
    """Whether Keras writes TensorBoard logs here (logs.py): TensorFlow's backend and writer."""
    return keras.backend.backend() == "tensorflow" and all(
        importlib.util.find_spec(p) is not None for p in logs.WRITER)


def outside(config, root):
    """{path: content} of every entry under `root` but outside features/<NAME> and models/<NAME>
    (links and FIFOs by what they are, never followed)."""
    skip = {os.path.abspath(config.features_dir), os.path.abspath(config.models_dir)}
    found = {}
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [s for s in subfolders if os.path.join(folder, s) not in skip]
        for name in names + subfolders:
            path = os.path.join(folder, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                found[path] = "link to " + os.readlink(path)
            elif stat.S_ISREG(mode):
                with open(path, "rb") as f:
                    found[path] = f.read()
            elif not stat.S_ISDIR(mode):
                found[path] = "special"
    return found


def plant(path, kind, target):
    """A link (`symlink`, `hardlink`, `devnull`: a link to /dev/null) or a `fifo` at `path`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if kind == "symlink":
        os.symlink(target, path)
    elif kind == "hardlink":
        os.link(target, path)
    elif kind == "devnull":
        os.symlink(os.devnull, path)
    else:
        os.mkfifo(path)


def finishes(function, fifos, seconds=120):
    """function(), failing the test instead of hanging when it blocks on one of `fifos`."""
    result = {}

    def target():
        try:
            result["value"] = function()
        except BaseException as error:  # noqa: BLE001 - handed to the test below
            result["error"] = error
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    hung = thread.is_alive()
    if hung:  # let it go: a writer that opens and closes gives the blocked reader its EOF
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        thread.join(30)
    assert not hung, "blocked on a FIFO"
    if "error" in result:
        raise result["error"]
    return result["value"]


# --------------------------------------------------------------------------------------------
# 1: the files Keras's callbacks write, and the lock file
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["symlink", "hardlink", "devnull"])
@pytest.mark.parametrize("name", [artifacts.HEAD_LOG, artifacts.HEAD_CHECKPOINT])
def test_train_head_writes_through_no_link_planted_in_models(extracted, tmp_path, name, kind):
    config = extracted.replace(head="dense")
    planted = artifacts.path(config, name)
    plant(planted, kind, str(tmp_path / "victim.txt"))
    before = outside(config, tmp_path)
    train_head.run(config)
    assert outside(config, tmp_path) == before  # the victim, above all, is unchanged
    info = os.lstat(planted)  # the link was replaced by a file of train-head's own
    assert stat.S_ISREG(info.st_mode) and info.st_nlink == 1 and info.st_size > 0
    with open(artifacts.path(config, artifacts.HEAD_LOG)) as f:
        assert f.readline().startswith("epoch,")


@pytest.mark.parametrize("kind, message", [
    ("symlink", r"\.lock is a link, not a lock file: remove it"),
    ("devnull", r"\.lock is a link, not a lock file: remove it"),
    ("hardlink", r"\.lock is a hard link to another file, not a lock file: remove it"),
    ("fifo", r"\.lock is not a regular file \(FIFO\), not a lock file: remove it"),
])
def test_a_planted_lock_file_is_refused_and_its_target_kept(extracted, tmp_path, kind, message):
    config = extracted.replace(head="logreg")
    plant(os.path.join(config.models_dir, lock.LOCK), kind, str(tmp_path / "victim.txt"))
    before = outside(config, tmp_path)
    with pytest.raises(UserError, match=message):
        train_head.run(config)
    with pytest.raises(UserError, match=message):  # finetune's lock, the same one
        with lock.exclusive(config.models_dir, "finetune"):
            pass
    assert outside(config, tmp_path) == before
    assert not os.path.exists(artifacts.path(config, artifacts.LOGREG))


@pytest.mark.parametrize("names", [(artifacts.FINETUNE_LOG, artifacts.FINETUNE_BACKUP,
                                    "logs/finetune"), (artifacts.LOGS,)],
                         ids=["files", "logs folder"])
def test_finetune_writes_through_no_link_planted_in_models(prepared, tmp_path, names):
    """Links at the files and folders that fine-tuning writes, all at once (a run each costs
    seconds): each is replaced by finetune's own, and what it points at is kept."""
    (tmp_path / "victim.txt").write_bytes(VICTIM)
    config = prepared((extract.run, train_head.run), head="dense", **TINY)
    target = outside_folder(tmp_path)
    planted = [artifacts.path(config, name) for name in names]
    for name, path in zip(names, planted):
        if os.path.isdir(path):  # logs/: train-head made it
            shutil.rmtree(path)
        plant(path, "symlink", str(tmp_path / "victim.txt" if name == artifacts.FINETUNE_LOG
                                   else target))
    before = outside(config, tmp_path)
    finetune.run(config)
    assert outside(config, tmp_path) == before  # nothing written, truncated or deleted there
    for path in planted:
        assert not os.path.islink(path) and os.path.exists(path), path  # finetune's own now
    if logs_written():
        assert event_files(os.path.join(config.models_dir, "logs", "finetune"))


def outside_folder(tmp_path):
    """A folder of the user's that a planted link points at, with files where a run would
    write or delete (head/, finetune/, train/ as under models/<NAME>/logs/)."""
    folder = tmp_path / "folder"
    for sub in ("", "head", "finetune", "train", "head/train"):
        (folder / sub).mkdir(exist_ok=True)
        (folder / sub / "keep.txt").write_bytes(VICTIM)
    return folder


def event_files(folder):
    return [os.path.join(f, n) for f, _, names in os.walk(folder) for n in names
            if "tfevents" in n]


@pytest.mark.skipif(not logs_written(), reason="TensorBoard logs need TensorFlow and tensorboard")
@pytest.mark.parametrize("planted", ["logs", "logs/head", "logs/head/train"])
def test_train_head_writes_no_tensorboard_log_through_a_link(extracted, tmp_path, planted):
    """Keras's TensorBoard callback writes into models/<NAME>/logs/head/, which train-head empties
    first: a link there, or at the logs folder, is replaced, never followed."""
    config = extracted.replace(head="dense")
    target = outside_folder(tmp_path)
    plant(os.path.join(config.models_dir, planted), "symlink", str(target))
    before = outside(config, tmp_path)
    train_head.run(config)
    assert outside(config, tmp_path) == before  # nothing written or deleted in the user's folder
    head = os.path.join(config.models_dir, "logs", "head")
    assert not any(os.path.islink(p) for p in (os.path.dirname(head), head, f"{head}/train"))
    assert event_files(head)  # the logs are train-head's own, in models/<NAME>


@pytest.mark.parametrize("planted", [audit.FOLDER] + [
    f"{audit.FOLDER}/{name}" for name in (audit.SUMMARY, audit.OUTLIER_MODEL, *audit.LEGACY)])
def test_audit_writes_through_no_link_planted_in_models(extracted, tmp_path, planted):
    """audit's folder, or one of its files, as a link: replaced by audit's own, target kept."""
    target = outside_folder(tmp_path) if planted == audit.FOLDER else tmp_path / "victim.txt"
    path = os.path.join(extracted.models_dir, planted)
    plant(path, "symlink", str(target))
    before = outside(extracted, tmp_path)
    result = audit.run(extracted.replace(duplicate_threshold=0.5))  # some pairs, so a picture
    assert outside(extracted, tmp_path) == before
    assert not os.path.islink(result.folder)
    for name in os.listdir(result.folder):
        info = os.lstat(os.path.join(result.folder, name))
        assert stat.S_ISREG(info.st_mode) and info.st_nlink == 1, name
    assert not os.path.islink(path)  # audit's own folder or file now, or none (no picture)
    assert result.summary["rows"] == 20


def test_no_link_folder_removes_links_and_keeps_the_backup(tmp_path):
    """For finetune's backup folder: a link at it, or inside it, goes; its target stays."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_bytes(VICTIM)
    backup = tmp_path / "models" / "backup"
    backup.parent.mkdir()
    os.symlink(tmp_path / "elsewhere", backup)
    files.no_link_folder(str(backup))
    assert not os.path.lexists(backup)
    assert (tmp_path / "elsewhere" / "keep.txt").read_bytes() == VICTIM
    (backup / "inner").mkdir(parents=True)
    (backup / "state.json").write_text("{}")
    os.symlink(tmp_path / "elsewhere" / "keep.txt", backup / "inner" / "latest.weights.h5")
    os.symlink(tmp_path / "elsewhere", backup / "linked")
    files.no_link_folder(str(backup))
    assert sorted(os.listdir(backup)) == ["inner", "state.json"]
    assert os.listdir(backup / "inner") == []
    assert (tmp_path / "elsewhere" / "keep.txt").read_bytes() == VICTIM
    (tmp_path / "dir").mkdir()
    with pytest.raises(UserError, match=r"dir is a folder where a file is written: remove it"):
        files.no_link(str(tmp_path / "dir"))


# --------------------------------------------------------------------------------------------
# 2: one writer of models/<NAME> at a time
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("holder", ["train-head", "finetune", "evaluate", "report"])
def test_train_head_waits_for_no_other_writer_of_models(extracted, tmp_path, holder):
    config = extracted.replace(head="logreg")
    before = outside(config, tmp_path)
    with lock.exclusive(config.models_dir, holder):
        with pytest.raises(UserError, match=rf"^another {holder} \(pid {os.getpid()}\) is "
                                            r"writing .*tiny: wait for it to finish"):
            train_head.run(config)
    assert not os.path.exists(artifacts.path(config, artifacts.LOGREG))
    assert outside(config, tmp_path) == before
    train_head.run(config)  # once it is released
    assert os.path.exists(artifacts.path(config, artifacts.LOGREG))


# --------------------------------------------------------------------------------------------
# 3: what report and predict read back
# --------------------------------------------------------------------------------------------

@pytest.fixture
def evaluated(prepared, tmp_path):
    """`extracted` with a logistic regression trained and evaluated."""
    (tmp_path / "victim.txt").write_bytes(VICTIM)
    return prepared((extract.run, train_head.run, evaluate.run), head="logreg", **TINY)


def logreg_scores(config, change):
    edit_json(artifacts.path(config, artifacts.EVALUATION), lambda e: change(e["models"]["logreg"]))


@pytest.mark.parametrize("key, value, shown", [
    ("accuracy", "0.99", "'0.99'"), ("accuracy", 1.5, "1.5"), ("loss", -1, "-1"),
    ("misclassified_count", "3", "'3'"), ("roc_auc", [1], r"\[1\]"),
])
def test_a_wrong_type_or_range_in_evaluation_json_is_one_line(evaluated, tmp_path, key, value,
                                                             shown):
    logreg_scores(evaluated, lambda m: m.update({key: value}))
    before = outside(evaluated, tmp_path)
    with pytest.raises(UserError, match=rf"evaluation.json is damaged .*\(models\.logreg\.{key} "
                                        rf"is {shown}, not .*\): run `make evaluate` again$"):
        report.run(evaluated)
    assert not os.path.exists(artifacts.path(evaluated, artifacts.REPORT))
    assert outside(evaluated, tmp_path) == before


def test_a_mistake_at_a_fifo_is_passed_over(evaluated, tmp_path):
    fifo = os.path.join(evaluated.data, "vertical", "fifo.jpg")
    os.mkfifo(fifo)
    mistake = {"path": "vertical/fifo.jpg", "true": "vertical", "predicted": "horizontal",
               "probability": 0.9}
    logreg_scores(evaluated, lambda m: m.update(misclassified=[mistake], misclassified_count=1))
    before = outside(evaluated, tmp_path)
    result = finishes(lambda: report.run(evaluated), [fifo])
    text = open(result.path).read()
    assert "could not be opened" in text  # the one mistake is not shown, the report is written
    assert outside(evaluated, tmp_path) == before


@pytest.mark.parametrize("path", ["/etc/hostname", "../victim.txt", "vertical/../../victim.txt"])
def test_a_mistake_outside_the_data_is_refused(evaluated, path):
    mistake = {"path": path, "true": "vertical", "predicted": "horizontal", "probability": 0.9}
    logreg_scores(evaluated, lambda m: m.update(misclassified=[mistake]))
    with pytest.raises(UserError, match=r"misclassified\[0\]\.path is .*, not a path inside the "
                                        r"data folder\): run `make evaluate` again"):
        report.run(evaluated)


def test_text_read_back_is_escaped_in_the_report(evaluated, tmp_path):
    script = "<script>alert(1)</script>"
    edit_json(artifacts.path(evaluated, artifacts.EVALUATION),
              lambda e: e.update(data_root=f"x`{script}", weights_notice=f"![x]({script})"))
    logreg_scores(evaluated, lambda m: m.update(
        confusion_matrix_png=f"x.png){script}",
        misclassified=[{"path": "gone.jpg", "true": "vertical", "predicted": "horizontal",
                        "probability": 0.5}], misclassified_count=1))
    before = outside(evaluated, tmp_path)
    text = open(report.run(evaluated).path).read()
    assert "`` x`<script>alert(1)</script> ``" in text  # a code span: shown as is
    prose = re.sub(r"(`+) .*? \1", "", text)  # outside code spans, nothing left active:
    assert not re.search(r"(?<!\\)<", prose)  # no tag
    assert not re.search(r"(?<!\\)!\[x", prose)  # no picture
    assert r"\!\[x\](\<script\>alert(1)\</script\>)" in prose  # escaped, not removed
    # a picture evaluation.json does not name by its hash is left out, in one line
    assert "(The confusion matrix (logistic regression) picture is not recorded, so it is " \
        "left out: run `make evaluate` again.)" in text and "x.png" not in text
    assert outside(evaluated, tmp_path) == before


def test_a_fifo_at_evaluation_json_is_one_line(evaluated):
    path = artifacts.path(evaluated, artifacts.EVALUATION)
    os.remove(path)
    os.mkfifo(path)
    with pytest.raises(UserError, match=r"evaluation.json is not a regular file \(FIFO\): remove "
                                        r"it; run `make evaluate` first"):
        finishes(lambda: report.run(evaluated), [path])


@pytest.mark.parametrize("value", [1.5, -0.1, "0.99", None])
def test_a_validation_accuracy_out_of_range_is_refused(evaluated, tmp_path, value, capsys):
    """validation.accuracy steers MODEL=auto: 1.5 would win over every honest model."""
    path = artifacts.path(evaluated, artifacts.HEAD_METRICS)
    edit_json(path, lambda m: m["models"]["logreg"]["validation"].update(accuracy=value))
    message = (r"head_metrics.json is damaged .*\(models\.logreg\.validation\.accuracy is "
               r".*, not a number from 0 to 1\): rerun `make train-head`$")
    with pytest.raises(UserError, match=message):
        registry.record(evaluated, "logreg")
    with pytest.raises(UserError, match=message):
        predict.run(evaluated.replace(images=evaluated.data, model="logreg"))
    with pytest.raises(UserError, match="no trained model"):  # auto: passed over, with one line
        predict.run(evaluated.replace(images=evaluated.data))
    assert "passed over: " in capsys.readouterr().out
    assert not os.path.exists(artifacts.path(evaluated, artifacts.PREDICTIONS))
