"""The settings the cache remembers (cache.settings), and mistakes that speak the user's words:
a later stage takes what extract was told, refuses what contradicts it, and records what it used;
make refuses a misspelled variable; a bad value names the Make variable the user typed."""
import json
import os
import shutil
import subprocess

import pytest
from helpers import make_image_folder, tiny_config

from pipeline import __main__ as cli
from pipeline import evaluate, extract, finetune, train_head
from pipeline.cache import settings
from pipeline.config import RECORDED, Config, UserError, describe, warn, with_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD = {"data": "/photos/pets", "labels": "", "label_columns": "filename,label",
          "split": "80/10/10", "size": 64, "weights": "none", "augment": 2,
          "precision": "float32", "storage": "float32"}


def record(**changes):
    return settings.Record({**RECORD, **changes}, "features/pets", paths=("cat/1.jpg",))


# --------------------------------------------------------------------------------------------
# resolve: not told -> recorded; told the same -> kept; told otherwise -> one line
# --------------------------------------------------------------------------------------------

def test_a_setting_not_told_takes_the_recorded_value():
    resolved = settings.resolve(Config(name="pets"), record(), "train-head")
    assert {name: getattr(resolved, name) for name in RECORD} == RECORD


def test_without_a_cache_the_defaults_written_in_config_apply():
    resolved = settings.resolve(Config(name="pets"), None, "train-head")
    assert (resolved.size, resolved.augment, resolved.weights) == (150, 5, "imagenet")


@pytest.mark.parametrize("told, variable, was", [
    (dict(augment=3), "AUGMENT=3", "AUGMENT=2"),
    (dict(augment=5), "AUGMENT=5", "AUGMENT=2"),  # told the default is still told
    (dict(size=96), "SIZE=96", "SIZE=64"),
    (dict(weights="imagenet"), "WEIGHTS=imagenet", "WEIGHTS=none"),
    (dict(precision="mixed_bfloat16"), "PRECISION=mixed_bfloat16", "PRECISION=float32"),
    (dict(storage="float16"), "STORAGE=float16", "STORAGE=float32"),
    (dict(split="70/20/10"), "SPLIT=70/20/10", "SPLIT=80/10/10"),
    (dict(data="/elsewhere"), "DATA=/elsewhere", "DATA=/photos/pets"),
])
def test_a_setting_told_otherwise_is_refused_naming_both_values_and_the_way_on(told, variable,
                                                                              was):
    name = variable.split("=")[0]
    with pytest.raises(UserError, match=rf"^{variable} but features/pets was extracted with "
                                        rf"{was}: run `make extract NAME=pets {variable}` first, "
                                        rf"or leave {name} out$"):
        settings.resolve(Config(name="pets", **told), record(), "finetune")


def test_labels_told_to_a_cache_made_without_them_is_refused():
    with pytest.raises(UserError, match=r"^LABELS=/l.csv but features/pets was extracted "
                                        r"without LABELS: "):
        settings.resolve(Config(name="pets", labels="/l.csv"), record(), "evaluate")


@pytest.mark.parametrize("told", [dict(augment=2, size=64), dict(split="8/1/1"),
                                  dict(weights="none", precision="float32")])
def test_a_setting_told_its_recorded_value_is_accepted(told):
    resolved = settings.resolve(Config(name="pets", **told), record(), "train-head")
    assert (resolved.augment, resolved.size) == (2, 64)


def test_extract_takes_what_it_is_told_and_keeps_the_record_for_the_rest():
    resolved = settings.resolve(Config(name="pets", augment=3), record(), "extract")
    assert (resolved.augment, resolved.size, resolved.data) == (3, 64, "/photos/pets")


def test_a_data_folder_that_holds_the_cached_images_is_the_same_dataset(tmp_path):
    """The folder moved, or a copy: the stage reads it (its contents are checked there)."""
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "1.jpg").write_bytes(b"x")
    resolved = settings.resolve(Config(name="pets", data=str(tmp_path)), record(), "finetune")
    assert resolved.data == str(tmp_path)


def test_a_record_of_the_wrong_type_is_refused_by_later_stages_and_ignored_by_extract():
    bad = settings._checked({**RECORD, "size": "64"}, "features/pets", ())
    with pytest.raises(UserError, match=r"^features/pets/features.h5 cannot be used \(it records "
                                        r"SIZE='64', not a whole number\): "
                                        r"run `make extract NAME=pets`"):
        settings.resolve(Config(name="pets"), bad, "train-head")
    assert settings.resolve(Config(name="pets"), bad, "extract").size == 150


def test_a_cache_made_before_the_record_is_read_from_what_it_holds():
    """A cache without `settings` (older, or built by hand as bench's synthetic one): the views
    it holds, not its config's AUGMENT=5 default, which train-head refused against 0 views."""
    values = settings._values({"config": {"augment": 5, "size": 64, "weights": ""},
                               "weights_spec": "none", "data_root": "/d"})
    assert (values["augment"], values["size"], values["weights"], values["data"]) == \
        (0, 64, "none", "/d")
    assert settings._values({"augment": {"views": 2}, "settings": {"size": 32}})["augment"] == 2


def test_a_config_not_told_holds_none_yet_validates_and_lists_its_defaults():
    config = Config()
    assert all(getattr(config, name) is None for name in RECORDED)
    assert config.dataset_name == "demo" and config.told_or_default("size") == 150
    with pytest.raises(UserError, match="SIZE=16 is out of range"):
        Config(size=16)
    assert "(default 150); after extract, as the cache recorded it" in describe()


# --------------------------------------------------------------------------------------------
# Messages: misspelled Make variables, bad values in Make's words, NAME= in every hint
# --------------------------------------------------------------------------------------------

def _make(*args):
    """make in the checkout, as a user runs it: not as a sub-make of `make test`, whose
    MAKEFLAGS and MAKELEVEL would add "Entering directory" lines and its own variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    return subprocess.run(["make", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("target, typed, meant", [("extract", "AUGMNT=3", "AUGMENT"),
                                                  ("train-head", "EPOCS=3", "EPOCHS"),
                                                  ("finetune", "lr=1e-5", "LR")])
def test_make_refuses_a_variable_that_is_no_setting_naming_the_nearest(target, typed, meant):
    done = _make("-n", target, "NAME=x", typed)
    assert done.returncode != 0 and done.stdout == ""
    line, = done.stderr.strip().splitlines()
    assert f"unknown variable {typed.split('=')[0]} (did you mean {meant}?)" in line


def test_make_passes_its_settings_and_its_own_variables():
    done = _make("-n", "train-head", "NAME=x", "EPOCHS=3", "BENCH_N=2", "TEST_WORKERS=1")
    assert done.returncode == 0, done.stderr
    assert "PIPELINE_FROM_MAKE=1" in done.stdout and "--epochs='3'" in done.stdout
    assert "demo-data" not in done.stdout  # NAME's cache knows its DATA: no demo images made


@pytest.mark.parametrize("option, from_make, expected", [
    ("--finetune-epochs=two", True, "FINETUNE_EPOCHS='two' is not a whole number: use e.g. "
                                    "FINETUNE_EPOCHS=10"),
    ("--lr=fast", True, "LR='fast' is not a number: use e.g. LR=0.0001"),
    ("--finetune=maybe", True, "FINETUNE='maybe' is not 1 or 0: use e.g. FINETUNE=1"),
    ("--finetune-epochs=two", False, "--finetune-epochs 'two' is not a whole number: see "
                                     "`python -m pipeline --help`"),
])
def test_a_bad_value_is_named_as_the_user_typed_it(monkeypatch, capsys, option, from_make,
                                                   expected):
    monkeypatch.setenv(cli.FROM_MAKE, "1" if from_make else "0")
    with pytest.raises(SystemExit) as exit:
        cli.main(["finetune", option])
    assert exit.value.code == 2 and capsys.readouterr().err == f"error: {expected}\n"


@pytest.mark.parametrize("message, expected", [
    ("run `make train-head` first", "run `make train-head NAME=pets` first"),
    ("run `make extract DATA=<folder>` first", "run `make extract NAME=pets DATA=<folder>` first"),
    ("`make extract NAME=pets SIZE=3`", "`make extract NAME=pets SIZE=3`"),  # named already
    ("`make install` and `make evaluate`", "`make install` and `make evaluate NAME=pets`"),
])
def test_every_hint_carries_the_dataset_name(message, expected):
    assert with_name(message, "pets") == expected
    assert with_name("`make report`", "my pets") == "`make report NAME='my pets'`"


def test_a_warning_names_the_dataset_of_the_run_in_its_hint(monkeypatch, capsys):
    from pipeline import messages
    monkeypatch.setattr(messages, "_HINTS_ABOUT", [""])
    warn("run `make evaluate` again")
    messages.hints_about("pets")
    warn("run `make evaluate` again")
    assert capsys.readouterr().out == ("!!! run `make evaluate` again\n"
                                       "!!! run `make evaluate NAME=pets` again\n")


def test_a_refusal_from_the_cli_names_the_dataset_in_its_hint(tmp_path, capsys):
    (tmp_path / "f" / "pets").mkdir(parents=True)
    (tmp_path / "f" / "pets" / "features.h5").write_bytes(b"junk")  # the store names no NAME
    code = cli.main(["train-head", "--name", "pets", "--features-root", str(tmp_path / "f"),
                     "--models-root", str(tmp_path / "m")])
    assert code == 2 and "run `make extract NAME=pets` to rebuild it" in capsys.readouterr().err
    warn("run `make evaluate` again")  # after the run, warnings are about no dataset of its
    assert capsys.readouterr().out == "!!! run `make evaluate` again\n"


# --------------------------------------------------------------------------------------------
# The whole way: extract is told once, later stages are not, and records say what was used
# --------------------------------------------------------------------------------------------

def test_later_stages_take_the_settings_extract_was_told_and_record_them(tmp_path, capsys):
    """`make extract DATA=~/pets SIZE=96` then `make train-head NAME=pets`: head_metrics.json
    said data/demo and 150, and AUGMENT had to be told again (AUGMENT=5 was refused)."""
    data = os.path.abspath(make_image_folder(tmp_path / "pets", per_class=6))
    told = tiny_config(str(tmp_path), data, size=48, augment=2, epochs=1)
    extract.run(told)
    assert "skipped" not in capsys.readouterr().out  # nothing was: no pointer to skipped.csv
    later = Config(name="pets", features_root=told.features_root, models_root=told.models_root,
                   epochs=1, batch_size=4, finetune_epochs=1)
    used = {"data": data, "size": 48, "augment": 2, "weights": "none", "precision": "float32"}
    head = train_head.run(later.replace(head="dense")).metrics["config"]
    assert {k: head[k] for k in used} == used
    finetuned = json.load(open(finetune.run(later).metrics_path))["config"]
    assert {k: finetuned[k] for k in used} == used
    evaluate.run(later)
    with open(os.path.join(told.models_dir, "evaluation.json")) as f:
        evaluated = json.load(f)["config"]
    assert {k: evaluated[k] for k in used} == used
    with pytest.raises(UserError, match=r"^AUGMENT=3 but .*pets was extracted with AUGMENT=2: "
                                        r"run `make extract NAME=pets AUGMENT=3` first"):
        train_head.run(later.replace(augment=3))


def test_extract_again_keeps_the_record_and_follows_a_data_folder_that_moved(tmp_path):
    data = make_image_folder(tmp_path / "pets", per_class=3)
    extract.run(tiny_config(str(tmp_path), data, augment=1))
    moved = str(tmp_path / "moved" / "pets")
    shutil.move(data, moved)
    not_told = Config(name="pets", data=moved, features_root=str(tmp_path / "features"),
                      models_root=str(tmp_path / "models"), batch_size=4)
    result = extract.run(not_told)
    assert result.new == 0 and result.changed  # the record changed, no feature was computed
    kept = settings.read(not_told.features_dir).values
    assert (kept["data"], kept["augment"], kept["size"]) == (moved, 1, 32)


@pytest.mark.parametrize("told", [["seed"], ["unfreeze"], ["finetune_from", "cut_storage"]])
def test_what_extract_was_told_to_cache_is_remembered_and_a_later_stage_may_change_it(told):
    """SEED (the views) and UNFREEZE, FINETUNE_FROM, CUT_STORAGE (the cut) decide what extract
    caches, not which rows: a stage not told them takes extract's; told, it is not refused."""
    remembered = record(seed=3, unfreeze="block4", finetune_from="images", cut_storage="float32")
    resolved = settings.resolve(Config(name="pets"), remembered, "finetune")
    assert (resolved.seed, resolved.unfreeze, resolved.finetune_from, resolved.cut_storage) == \
        (3, "block4", "images", "float32")
    other = {"seed": 1, "unfreeze": "block5", "finetune_from": "cache", "cut_storage": "float16"}
    changed = settings.resolve(Config(name="pets", **{k: other[k] for k in told}), remembered,
                               "train-head")
    assert {k: getattr(changed, k) for k in told} == {k: other[k] for k in told}


def test_extract_again_untold_keeps_its_views_and_cut_and_finetune_trains_from_them(tmp_path):
    """`make extract SEED=3 UNFREEZE=block4`, new images, then `make extract` and `make finetune`
    untold: the rerun computed every view and a new cut again (SEED=0, block4_pool), and
    finetune, wanting block5's cut, fell back to the images."""
    data = make_image_folder(tmp_path / "pets", per_class=7)
    later = [os.path.join(folder, sorted(os.listdir(os.path.join(data, folder)))[-1])
             for folder in ("horizontal", "vertical")]  # the new images of the rerun
    for name in later:
        os.rename(os.path.join(data, name), tmp_path / os.path.basename(name))
    told = tiny_config(str(tmp_path), data, augment=1, seed=3, unfreeze="block4", epochs=1,
                       split="50/25/25")
    first = extract.run(told)
    assert first.cut == "block3_pool"
    for name in later:
        os.rename(tmp_path / os.path.basename(name), os.path.join(data, name))
    untold = Config(name="pets", features_root=told.features_root, models_root=told.models_root,
                    batch_size=4, epochs=1, finetune_epochs=1)
    again = extract.run(untold)
    assert again.new == 2 and again.cut == "block3_pool"
    assert again.new_views <= 2  # the new images' views only, not every training image's again
    kept = settings.read(untold.features_dir).values
    assert (kept["seed"], kept["unfreeze"]) == (3, "block4")
    train_head.run(untold.replace(head="dense"))
    tuned = finetune.run(untold)
    assert tuned.source == "cache"
    assert json.load(open(tuned.metrics_path))["config"]["unfreeze"] == "block4"


def test_the_reports_settings_are_what_extract_recorded_not_what_report_was_told(tmp_path):
    from pipeline import report
    data = make_image_folder(tmp_path / "pets", per_class=3)
    told = tiny_config(str(tmp_path), data, seed=3)
    extract.run(told)
    shown = report._recorded_settings(told.replace(seed=5, unfreeze="block4"))
    assert (shown["SEED"], shown["UNFREEZE"], shown["SIZE"]) == (3, "", 32)


def test_extract_names_skipped_csv_only_when_it_skipped_something(tmp_path, capsys):
    data = make_image_folder(tmp_path / "pets", per_class=3)
    (tmp_path / "pets" / "horizontal" / "broken.jpg").write_bytes(b"not a picture")
    extract.run(tiny_config(str(tmp_path), data))
    assert ", 1 skipped (see " in capsys.readouterr().out


def test_batch_summary_states_each_datasets_settings(tmp_path):
    from pipeline import batch
    row = {**dict.fromkeys(batch.COLUMNS, ""), "dataset": "pets", "data": "/photos/pets",
           "status": "trained", "settings": "SIZE=64 AUGMENT=2 WEIGHTS=none"}
    result = batch.BatchResult([row], str(tmp_path / "summary.csv"), str(tmp_path / "summary.md"))
    batch.write_summary(result)
    assert "- pets: DATA=/photos/pets SIZE=64 AUGMENT=2 WEIGHTS=none" in \
        (tmp_path / "summary.md").read_text()
    assert "SIZE=64 AUGMENT=2 WEIGHTS=none" in (tmp_path / "summary.csv").read_text()
