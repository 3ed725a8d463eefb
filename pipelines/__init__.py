"""The work, laid out along the data's path; `flows/` only sequences it.

- `source/`: the ILSVRC2012 source as users hold it (the archives, an extracted tree, Kaggle's layout) and the
  built-in demo generator that writes the same archive format.
- `staging/`: a source -> checked RGB images -> minival hold-out -> one staged dataset version (WebDataset
  shards per resolution tier, optionally FFCV files and DALI indexes), resumable, incremental.
- `dataset.py`: the contract every stage agrees on: the files of a staged version and how to read them.
- `loading/`: `make_loader` over a staged version, for one rank of one epoch (wds, ffcv or dali backend).
- `training/`: recipes, the Ray Train job and its worker loop, schedules, augmentation, MLflow tracking.
- Leaves any part may use, importing nothing of the project: `settings.py` (where data and servers are),
  `atomic.py` (files written whole or not at all), `seeds.py` (one seed-mixing rule), `watchdog.py`.

Imports run one way: flows -> training, staging, source -> loading -> dataset (tests/unit/test_layout.py).
"""
