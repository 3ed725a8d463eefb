"""Prefect flows that sequence `pipelines/`: `stage-imagenet`, `train-family`, `nightly`, `transfer`,
`search-scaling`, `scaling-study`, `search-baseline` and `demo`; their deployments and the nightly schedule
(`deployments.py`); one line for a failed run (`failures.py`). The `effnet` command line that drives them is
`cli/`."""
