"""What people read: figures, Markdown and HTML pages, built from what the stages recorded.

    plots        matplotlib figures, saved without a display
    pictures     pictures named by their content, so one JSON file is the commit point
    diagnostics  ROC and PR curves, confused pairs, the feature projection, stage times
    markdown     report.md and its self-contained report.html; escaping for both
    sections     the report's sections, from evaluation.json (untrusted, checked)

Imports pipeline.config, fs, data, cache and model; never analysis, engines or a stage.
"""
