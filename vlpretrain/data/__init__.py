"""The data pipeline: sources in several formats (``manifest`` opens them), per-sample sizes, the global step
plan (the same on every rank in every layout: one modality per step, the language-share warm-up, packing), and
each rank's share of it as fixed-shape microbatches (``loader.DataPipeline``). Resumable from a small state.
"""
