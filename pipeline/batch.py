"""Every stage on many datasets, rerunning only what changed.

    make batch DATASETS="data/birds data/cars" [FINETUNE=0] [FORCE=1] [LABELS=labels.csv]
    make batch BATCH_FILE=datasets.txt       # one "folder [name] [labels.csv] [backbone]" a line

For each dataset: extract -> train-head -> finetune (unless FINETUNE=0) -> evaluate -> audit (the
cache's near-duplicates, leakage and label issues: docs/audit.md). A dataset that fails is recorded
with its error and the batch goes on; the batch exits non-zero at the end. An audit that cannot
judge a dataset (a class smaller than AUDIT_FOLDS) is noted in its error column, but its models
stand.
Writes models/batch_summary.csv and models/batch_summary.md, one row per dataset.

Reruns cost only what changed. Extract always runs first: on an unchanged folder it only stats the
files (their hashes are reused from the last run) and computes nothing. Then the dataset's
models/<NAME>/batch_state.json says what the last successful batch run saw: the feature index
digest (paths, labels, content hashes, splits and feature identity), the settings that shape the
models, and the size and time of every model file. When all of it is the same, training, fine-tuning
and evaluation are skipped and the summary shows the recorded metrics. FORCE=1 retrains anyway.
The audit is skipped likewise when its audit.json describes the same cache and audit settings.
Where images were added, extract computes only the new ones and the models are retrained.
"""
import os
import shlex
import time
import traceback
from dataclasses import dataclass

from . import audit, cache, extract
from .cache import settings
from .config import RECORDED, Config, UserError
from .data import backbones, datasets, labels
from .fs import artifacts, files
from .fs.escape import csv_dicts, csv_writer, markdown_text, terminal_text
from .model import registry

SUMMARY_CSV = "batch_summary.csv"   # in MODELS_ROOT, beside the datasets' folders
SUMMARY_MD = "batch_summary.md"
STATE = "batch_state.json"          # in models/<NAME>/
# Settings that never change a dataset's models: the batch's own bookkeeping and prediction.
NOT_MODEL_INPUTS = ("datasets", "batch_file", "force", "fresh", "images", "model", "out",
                    "top_k", "format", *audit.SETTINGS)
# The files whose (size, mtime) must be as recorded for a dataset to count as unchanged.
TRACKED = sorted({file for kind in registry.KINDS.values() for file in (kind.file, kind.metrics)}
                | {artifacts.EVALUATION})
STAGES = ("extract", "train_head", "finetune", "evaluate", "audit")
AUDIT_COLUMNS = ["near_duplicates", "leakage_pairs", "label_issues", "outliers"]
MD_ERROR_CHARS = 300                # an error longer than this is cut in the markdown table
COLUMNS = (["dataset", "data", "backbone", "settings", "status", "classes", "class_names",
            "images", "skipped",
            "missing_files", "unlabelled", "new_images"]
           + [f"{stage}_s" for stage in STAGES] + ["total_s"]
           + [f"{m}_{split}_accuracy" for m in registry.NAMES for split in ("validation", "test")]
           + AUDIT_COLUMNS + ["error"])


@dataclass(frozen=True)
class Job:
    data: str
    name: str
    labels: str = ""
    backbone: str = ""  # BACKBONE for this dataset; empty: the batch's own


@dataclass
class BatchResult:
    rows: list           # one dict per dataset, keys COLUMNS
    csv_path: str
    md_path: str

    @property
    def failed(self):
        return [r["dataset"] for r in self.rows if r["status"] == "failed"]


class BatchFailed(UserError):
    """Some datasets failed; the others ran. Carries the result so callers can still read it."""

    def __init__(self, message, result):
        super().__init__(message)
        self.result = result


def run(config: Config) -> BatchResult:
    jobs = jobs_of(config)
    result = BatchResult([], os.path.join(config.models_root, SUMMARY_CSV),
                         os.path.join(config.models_root, SUMMARY_MD))
    for number, job in enumerate(jobs, 1):
        print(f"\n=== batch {number}/{len(jobs)}: {job.name} ({terminal_text(job.data)})",
              flush=True)
        result.rows.append(run_one(config.replace(data=job.data, name=job.name,
                                                  labels=job.labels,
                                                  backbone=job.backbone or config.backbone)))
        write_summary(result)  # after every dataset: an interrupted batch keeps what it did

    counts = {s: sum(r["status"] == s for r in result.rows) for s in ("trained", "unchanged",
                                                                       "failed")}
    print(f"\nbatch: {len(jobs)} datasets: {counts['trained']} trained, {counts['unchanged']} "
          f"unchanged (skipped), {counts['failed']} failed; wrote {result.md_path}")
    if result.failed:
        raise BatchFailed(f"{len(result.failed)} of {len(jobs)} datasets failed "
                          f"({', '.join(result.failed)}): their errors are in {result.md_path}",
                          result)
    return result


def jobs_of(config):
    """The datasets of DATASETS, then those of BATCH_FILE ("folder [name] [labels] [backbone]"
    per line; "" skips a field)."""
    jobs = [Job(folder, _basename(folder), config.labels) for folder in config.datasets]
    if config.batch_file:
        if not os.path.isfile(config.batch_file):
            raise UserError(f"BATCH_FILE {config.batch_file!r} does not exist: pass a text file "
                            "with one dataset folder (and optionally a name) per line")
        with open(config.batch_file) as f:
            for number, line in enumerate(f, 1):
                fields = shlex.split(line, comments=True)  # "quoted folder names" work
                if not fields:
                    continue
                if len(fields) > 4:
                    raise UserError(f"{config.batch_file} line {number} has {len(fields)} fields: "
                                    "write `folder [name] [labels.csv] [backbone]`, quoting names "
                                    "with spaces (\"\" for a field left empty)")
                folder, name, labels_csv, backbone = fields + [""] * (4 - len(fields))
                if backbone:
                    backbones.get(backbone)  # one line for a misspelt one, before any work
                jobs.append(Job(folder, name or _basename(folder), labels_csv or config.labels,
                                backbone))
    if not jobs:
        raise UserError("nothing to do: pass DATASETS=\"dirA dirB\" or BATCH_FILE=<file>")
    seen = {}
    for job in jobs:
        config.replace(data=job.data, name=job.name)  # refuses a bad name before any work
        if job.name in seen:
            raise UserError(f"two datasets are named {job.name!r} ({seen[job.name]} and "
                            f"{job.data}): list them in BATCH_FILE with a different name for each")
        seen[job.name] = job.data
    return jobs


def _basename(folder):
    return os.path.basename(os.path.normpath(folder))


def run_one(config):
    """One dataset through every stage; returns its summary row, with any error in it."""
    row = dict.fromkeys(COLUMNS, "")
    row.update(dataset=config.dataset_name, data=config.data,
               backbone=config.backbone or backbones.DEFAULT)  # until the cache says
    start = time.perf_counter()
    try:
        ex = _timed(row, "extract", extract.run, config)
        # the dataset's settings as extract recorded them: what every later stage uses
        config = settings.resolve(config, settings.read(config.features_dir), "batch")
        row.update(data=config.data, backbone=config.backbone, settings=" ".join(
            f"{name.upper()}={getattr(config, name)}" for name in RECORDED if name != "data"))
        row.update(images=ex.rows, skipped=ex.skipped, new_images=ex.new, **_skip_counts(config))
        state_path = artifacts.path(config, STATE)
        previous = _read_state(state_path)
        if (not config.force and previous
                and previous == _state(config, previous.get("models_ran", []))):
            row["status"] = "unchanged"
            print(f"batch {config.dataset_name}: nothing changed since the last batch run; "
                  "models kept (FORCE=1 retrains)")
        else:
            if os.path.exists(state_path):
                os.remove(state_path)  # until this run finishes, nothing counts as up to date
            ran = _train_and_evaluate(config, row)
            artifacts.write_json(state_path, _state(config, ran))
            row["status"] = "trained"
        row.update(_metrics(config, include_finetuned=config.finetune))
        _audit(config, row)
    except KeyboardInterrupt:
        raise
    except Exception as error:  # keep going: record it, the batch fails at the end
        row["status"] = "failed"
        row["error"] = str(error) if isinstance(error, UserError) else \
            f"{type(error).__name__}: {error}".replace("\n", " ")
        if not isinstance(error, UserError):
            traceback.print_exc()
        print(f"batch {config.dataset_name} FAILED: {terminal_text(row['error'])}", flush=True)
    finally:
        _free_memory()
    row["total_s"] = round(time.perf_counter() - start, 2)
    return row


def _train_and_evaluate(config, row):
    """The stages after extract, imported only when something changed. Fine-tuning resumes an
    interrupted backup only if it grew from the same head; a retrained head starts it afresh."""
    from . import evaluate, finetune, train_head
    _timed(row, "train_head", train_head.run, config)
    ran = ["train_head"]
    if config.finetune:
        _timed(row, "finetune", finetune.run, config)
        ran.append("finetune")
    _timed(row, "evaluate", evaluate.run, config)
    return ran + ["evaluate"]


def _audit(config, row):
    """The audit's counts into the row: from audit.json when it is up to date, else by running
    the audit. One it cannot make (too few images per class for the folds) is noted, not fatal."""
    summary = audit.current_summary(config)
    if summary is None:
        try:
            summary = _timed(row, "audit", audit.run, config).summary
        except UserError as error:
            row["error"] = f"audit skipped: {error}"
            print(f"batch {config.dataset_name}: audit skipped: {terminal_text(error)}",
                  flush=True)
            return
    row.update(near_duplicates=summary["near_duplicates"]["pairs"],
               leakage_pairs=summary["near_duplicates"]["cross_split_pairs"],
               label_issues=summary["label_issues"]["candidates"],
               outliers=summary["outliers"]["rows"])


def _timed(row, stage, function, config):
    start = time.perf_counter()
    result = function(config)
    row[f"{stage}_s"] = round(time.perf_counter() - start, 2)
    return result


def _state(config, models_ran):
    """What makes this dataset's models what they are: compared as a whole on the next run."""
    tracked = {}
    for name in TRACKED:
        path = artifacts.path(config, name)
        if os.path.exists(path):
            stat = os.stat(path)
            tracked[name] = [stat.st_size, stat.st_mtime_ns]
    used = {k: v for k, v in config.to_dict().items() if k not in NOT_MODEL_INPUTS}
    used["data"] = os.path.abspath(config.data)
    return {"index_digest": cache.master_attribute(config.features_dir, "index_digest"),
            "settings": used, "models_ran": list(models_ran), "files": tracked}


def _read_state(path):
    return artifacts.json_or_empty(path) or None


def _skip_counts(config):
    """The labels CSV's two kinds of unmatched entries, counted from skipped.csv."""
    path = cache.side_file(config.features_dir, datasets.SKIPPED)
    reasons = []
    if path:
        with files.open_regular(path, newline="", encoding="utf-8") as f:
            reasons = [r["reason"] for r in csv_dicts(f)]
    return {"missing_files": sum(r.startswith(labels.MISSING_FILE) for r in reasons),
            "unlabelled": sum(r == labels.UNLABELLED for r in reasons)}


def _metrics(config, include_finetuned):
    """Classes, and validation and test accuracy per model, from the files the stages wrote."""
    out = {}
    evaluation = registry.evaluation(config, required=False)
    trained, _ = registry.usable(config)
    names = evaluation.class_names if evaluation else []
    out.update(classes=len(names), class_names="; ".join(names))
    for model, record in trained.items():
        if model == "finetuned" and not include_finetuned:
            continue
        validation = record.validation.get("accuracy", "")
        tested = evaluation.models.get(model, {}) if evaluation else {}
        if evaluation and evaluation.split == "test" and "accuracy" in tested:
            test = tested["accuracy"]
        else:
            test = record.test.get("accuracy", "")
        out[f"{model}_validation_accuracy"] = round(validation, 4) if validation != "" else ""
        out[f"{model}_test_accuracy"] = round(test, 4) if test != "" else ""
    return out


def _free_memory():
    """Each dataset builds new Keras models; drop the old graphs so a long batch stays small."""
    import keras
    keras.backend.clear_session()


def write_summary(result):
    """models/batch_summary.csv (every column) and .md (a readable table), atomically. Names,
    folders and errors are untrusted text: neutralised for spreadsheets in the CSV
    (escape.csv_writer), inert in the Markdown (escape.markdown_text)."""
    os.makedirs(os.path.dirname(result.csv_path) or ".", exist_ok=True)
    with files.replacing_together([result.csv_path, result.md_path]) as temporary:
        with open(temporary[result.csv_path], "x", newline="", encoding="utf-8") as f:
            writer = csv_writer(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(result.rows)
        with open(temporary[result.md_path], "x", encoding="utf-8") as f:
            f.write("\n".join(_summary_lines(result)))


def _summary_lines(result):
    """The lines of batch_summary.md: one table row per dataset, then each one's settings."""
    header = ["dataset", "backbone", "status", "classes", "images",
              "skipped (missing / unlabelled)", "new",
              "extract s", "head s", "finetune s", "evaluate s", "audit s", "total s",
              "logreg val / test", "dense val / test", "fine-tuned val / test",
              "leakage pairs (near-duplicates)", "label issues", "error"]
    lines = [f"# Batch summary ({time.strftime('%Y-%m-%d %H:%M')})", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in result.rows:
        classes = r["class_names"].split("; ") if r["class_names"] else []
        shown = ", ".join(classes[:4]) + (f", … (+{len(classes) - 4})" if len(classes) > 4 else "")
        cells = [r["dataset"], r["backbone"], r["status"],
                 f"{r['classes']}: {shown}" if classes else "",
                 r["images"], f"{r['skipped']} ({r['missing_files']} / {r['unlabelled']})"
                 if r["skipped"] != "" else "", r["new_images"]]
        cells += [_seconds(r[f"{s}_s"]) for s in STAGES] + [_seconds(r["total_s"])]
        cells += [f"{_accuracy(r[f'{m}_validation_accuracy'])} / "
                  f"{_accuracy(r[f'{m}_test_accuracy'])}" for m in registry.NAMES]
        cells += [f"{r['leakage_pairs']} ({r['near_duplicates']})"
                  if r["leakage_pairs"] != "" else "–", r["label_issues"]]
        cells.append(r["error"][:MD_ERROR_CHARS])  # in full in the CSV
        lines.append("| " + " | ".join(markdown_text(c) for c in cells) + " |")
    lines += ["", "Accuracies: validation from training, test from `make evaluate`. Status "
              "`unchanged`: nothing changed since the last batch run, so only extract's file "
              "check ran. Skipped files are listed in features/<NAME>/skipped.csv. Leakage "
              "pairs: near-duplicate images in different splits; label issues: likely "
              "mislabelled images (both in models/<NAME>/audit/, docs/audit.md).", "",
              "Settings of each dataset, as its cache recorded them:", ""]
    lines += [f"- {markdown_text(r['dataset'])}: DATA={markdown_text(r['data'])} "
              f"{markdown_text(r['settings'])}" for r in result.rows if r["settings"]]
    return lines + [""]


def _seconds(value):
    return f"{value:.1f}" if value != "" else "–"


def _accuracy(value):
    return f"{value:.3f}" if value != "" else "–"
