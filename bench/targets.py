"""The figures `make bench` prints, each with its target (bench/README.md explains them), and
the ratios derived from the measured figures."""


def gain(key, what, minimum):
    """A stage's gain over the one before it, with its target, then the 95% interval of the
    split's noise around it (accuracy.paired_interval): rows of `table`."""
    return [(key, what, f">= {minimum:+g}" if minimum else ">= 0", lambda v: v >= minimum),
            (f"{key}_ci95_low", "  95% interval, low", "", None),
            (f"{key}_ci95_high", "  95% interval, high", "", None)]


# 5. accuracy (BENCH_ACCURACY=1, bench/accuracy.py): every stage must earn its keep. The three
# models' figures, once with the defaults and once with AUGMENT=5 (prefixed augment5_)
THREE_MODELS = [
    ("acc_logreg", "validation accuracy, logreg", "", None),
    ("acc_dense", "validation accuracy, dense head", "", None),
    ("acc_finetuned", "validation accuracy, fine-tuned", "", None),
    ("acc_logreg_test", "test accuracy, logreg", "", None),
    ("acc_dense_test", "test accuracy, dense head", "", None),
    ("acc_finetuned_test", "test accuracy, fine-tuned", "", None),
    *gain("dense_minus_logreg", "dense - logreg, validation", 0),
    *gain("dense_minus_logreg_test", "dense - logreg, test", 0),
    *gain("finetuned_minus_dense", "fine-tuned - dense, validation", 0.03),
    *gain("finetuned_minus_dense_test", "fine-tuned - dense, test", 0.03),
    ("finetune_worst_epoch_vs_head", "worst fine-tuning epoch - head, val.", ">= -0.01",
     lambda v: v >= -0.01),
]

# the head against logreg on BENCH_RESPLITS random re-splits of the same cache (bench/resplit.py):
# the mean gap and its 95% interval, and the re-splits where the head is at or above logreg
def resplit_gap(split, suffix):
    return [(f"resplit_dense_minus_logreg{suffix}", f"re-splits: dense - logreg, {split}", "",
             None),
            (f"resplit_dense_minus_logreg{suffix}_ci95_low", "  95% interval, low", "", None),
            (f"resplit_dense_minus_logreg{suffix}_ci95_high", "  95% interval, high", "", None),
            (f"resplit_dense_ge_logreg{suffix}", f"  re-splits with dense >= logreg, {split}",
             "", None)]


RESPLIT_GAPS = [("resplit_count", "re-splits of the cache (bench/resplit.py)", "", None),
                *resplit_gap("validation", ""), *resplit_gap("test", "_test")]

# 8. fine-tuning from the cache: its cost, its speed against the images, its accuracy over
# seeds against the images (K views per image), its memory
def seeds_rows(way, what):
    rows = []
    for split, suffix in (("validation", ""), ("test", "_test")):
        rows += [(f"seeds_{way}_finetuned{suffix}_mean", f"{what}: fine-tuned, {split}, mean", "",
                  None),
                 (f"seeds_{way}_finetuned{suffix}_ci95", "  95% t-interval, +/-", "", None)]
        if way != "images":
            rows += [(f"seeds_{way}_minus_images{suffix}_mean",
                      f"{what} - images, {split}, mean", ">= -0.01", lambda v: v >= -0.01),
                     (f"seeds_{way}_minus_images{suffix}_ci95", "  95% t-interval, +/-", "",
                      None)]
    return rows


def from_the_cache(synth_rows):
    return [
        ("cut_extract_seconds_none", "extract, AUGMENT=2, without the cut (s)", "", None),
        ("cut_extract_seconds_float16", "extract, with the cut in float16 (s)", "", None),
        ("cut_extract_seconds_float32", "extract, with the cut in float32 (s)", "", None),
        ("features_mb_per_1000_rows", "disk, features (MB per 1000 rows)", "", None),
        ("cut_mb_per_1000_rows_float16", "disk, cut in float16 (MB per 1000 rows)", "", None),
        ("cut_mb_per_1000_rows_float32", "disk, cut in float32 (MB per 1000 rows)", "", None),
        ("finetune_epoch_seconds_images", "fine-tuning epoch from the images (s)", "", None),
        ("finetune_epoch_seconds_cache", "fine-tuning epoch from the cache (s)", "", None),
        ("finetune_epoch_speedup", "  images / cache", ">= 6x", lambda v: v >= 6),
        ("finetune_train_pass_speedup", "  training pass alone, images / cache", "", None),
        *seeds_rows("images", "from the images"),
        *seeds_rows("cache5", "from the cache, AUGMENT=5"),
        *seeds_rows("cache10", "from the cache, AUGMENT=10"),
        *[(f"e2e_{way}_{key}", f"empty cache -> finetuned.keras, {what}: {item}", "", None)
          for way, what in (("cache10", "AUGMENT=10 from the cache"), ("images", "from the images"))
          for key, item in (("seconds", "wall clock (s)"), ("epochs", "epochs run"),
                            ("finetuned", "fine-tuned, validation"),
                            ("finetuned_test", "fine-tuned, test"))],
        ("e2e_cache10_seconds_vs_images", "  wall clock, cache / images", "<= 1",
         lambda v: v <= 1),
        ("finetune_cache_peak_rss_gb", f"finetune from the cache, peak RSS, {synth_rows:,} rows, "
         "K=2 (GB)", "<= 2", (lambda v: v <= 2) if synth_rows == 100_000 else None),
    ]

def table(synth_rows):
    """(key, what, target (as text), passes(value) -> bool) of every figure, in the order
    `make bench` prints them; the memory targets hold for synth_rows = 100,000."""
    return [
        ("extract_ips", "extraction, files -> HDF5 (img/s)", "", None),
        ("extract_rows_ps", "extraction, rows (images + views) / s", "", None),
        ("model_only_ips", "model-only limit (img/s)", "", None),
        ("naive_keras_ips", "naive Keras way (img/s)", "", None),
        # a row is one forward pass, as an image is in model-only; per image, extraction runs
        # 1 + AUGMENT passes for a training image, so that ratio is no target
        ("rows_ratio_vs_model_only", "extraction rows/s / model-only", ">= 0.9",
         lambda v: v >= 0.9),
        ("ratio_vs_model_only", "extraction img/s / model-only", "", None),
        ("ratio_vs_naive", "extraction / naive Keras", ">= 1.5", lambda v: v >= 1.5),
        ("head_epoch_s_cache", "head epoch on the cache (s)", "", None),
        ("head_epoch_s_frozen_base", "head epoch, frozen base in loop (s)", "", None),
        ("head_speedup", "frozen-base epoch / cache epoch", ">= 100x", lambda v: v >= 100),
        ("rerun_nothing_new_frac", "rerun, nothing new / full", "<= 3%", lambda v: v <= 0.03),
        ("rerun_10pct_new_frac", "rerun, 10% new / full", "<= 15%", lambda v: v <= 0.15),
        ("extract_peak_rss_gb", "extract peak RSS (GB)", "", None),
        ("train_head_peak_rss_gb_100k", f"train-head peak RSS, {synth_rows:,} rows (GB)", "<= 1.5",
         (lambda v: v <= 1.5) if synth_rows == 100_000 else None),
        ("ray_init_shutdown_s", "ray.init(num_cpus=2) + shutdown (s)", "", None),
        ("ray_bench_fixed_s_local", "extract 8 photos, ENGINE=local (s)", "", None),
        ("ray_bench_fixed_s_ray_1_worker", "extract 8 photos, ENGINE=ray, 1 worker (s)", "", None),
        ("ray_bench_steady_ips_local", "steady rate, ENGINE=local (img/s)", "", None),
        ("ray_bench_steady_ips_ray_1_worker", "steady rate, ENGINE=ray, 1 worker (img/s)", "",
         None),
        ("ray_bench_steady_ips_ray_2_workers", "steady rate, ENGINE=ray, 2 workers (img/s)", "",
         None),
        # 5. accuracy (BENCH_ACCURACY=1, bench/accuracy.py): every stage must earn its keep
        *THREE_MODELS,
        *RESPLIT_GAPS,
        ("acc_dense_augment5", "validation accuracy, dense head, AUGMENT=5", "", None),
        ("acc_dense_augment5_test", "test accuracy, dense head, AUGMENT=5", "", None),
        ("acc_dense_augment10", "validation accuracy, dense head, AUGMENT=10", "", None),
        ("acc_dense_augment10_test", "test accuracy, dense head, AUGMENT=10", "", None),
        ("finetune_best_epoch", "fine-tuning: best epoch (0 = the head kept)", "", None),
        ("head_epoch_s_views_augment5", "head epoch on cached views, AUGMENT=5 (s)", "", None),
        ("head_epoch_s_views_augment10", "head epoch on cached views, AUGMENT=10 (s)", "", None),
        ("head_epoch_s_frozen_augmented", "head epoch, frozen base + augmentation (s)", "", None),
        ("demo_logreg_test", "demo: test accuracy, logreg", "", None),
        ("demo_dense_test", "demo: test accuracy, dense head", "", None),
        ("demo_finetuned_test", "demo: test accuracy, fine-tuned", "", None),
        ("demo_finetuned_minus_dense_test", "demo: fine-tuned - dense, test", ">= 0",
         lambda v: v >= 0),
        ("demo_runs_agree", "demo: two runs, same seed, same figures", "= 1", lambda v: v == 1),
        # the same figures for the three models on AUGMENT=5 views (the augmented-finetune phase)
        *[(f"augment5_{key}", f"AUGMENT=5: {what}", target, passes)
          for key, what, target, passes in THREE_MODELS],
        ("acc_logreg_float16", "validation accuracy, logreg, STORAGE=float16", "", None),
        ("acc_dense_float16", "validation accuracy, dense head, STORAGE=float16", "", None),
        # 8. fine-tuning from the cache (bench/finetune_cache.py, bench/finetune_memory.py)
        *from_the_cache(synth_rows),
    ]


def derive(r):
    if "e2e_cache10_seconds" in r and "e2e_images_seconds" in r:
        r["e2e_cache10_seconds_vs_images"] = r["e2e_cache10_seconds"] / r["e2e_images_seconds"]
    if "extract_ips" in r and "model_only_ips" in r:
        r["ratio_vs_model_only"] = r["extract_ips"] / r["model_only_ips"]
    if "extract_rows_ps" in r and "model_only_ips" in r:
        r["rows_ratio_vs_model_only"] = r["extract_rows_ps"] / r["model_only_ips"]
    if "extract_ips" in r and "naive_keras_ips" in r:
        r["ratio_vs_naive"] = r["extract_ips"] / r["naive_keras_ips"]
    if "head_epoch_s_cache" in r and "head_epoch_s_frozen_base" in r:
        r["head_speedup"] = r["head_epoch_s_frozen_base"] / r["head_epoch_s_cache"]
