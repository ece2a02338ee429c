"""Evaluation reports: JSON (machine-readable), Markdown, PNG plots, and the run's HTML page.

- `plots`: matplotlib figures (Agg, no pyplot state): score histograms per model, win/tie/loss
  bars with intervals, metric trends across iterations;
- `markdown`: the Markdown of each kind of evaluation;
- `files`: writes an evaluation's report.json + report.md + *.png atomically;
- `run_report`: `selfreward report RUN`, one self-contained HTML page for a run.
"""
