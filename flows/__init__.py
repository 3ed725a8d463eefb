"""Prefect flows that sequence `pipelines/` (`stage-imagenet`, `train-family`, `demo`), their deployments and
the nightly schedule (`deployments.py`), and the `effnet` command line (`cli.py`) that drives them."""
