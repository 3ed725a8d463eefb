"""The `effnet` command line (`effnet.py`): thin wrappers over the flows and the pipelines."""
