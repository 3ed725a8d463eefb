"""The work, laid out along the data's path; the Prefect flows above only sequence it.

- `source/`: the ILSVRC2012 source as users hold it (the archives, an extracted tree, Kaggle's layout) and the
  built-in demo generator that writes the same archive format.
- `staging/`: a source -> checked RGB images -> minival hold-out -> one staged dataset version (WebDataset
  shards per resolution tier, optionally FFCV files and DALI indexes), resumable, incremental.
- `dataset.py`: the contract every stage agrees on: the files of a staged version and how to read them.
- `loading/`: `make_loader` over a staged version, for one rank of one epoch (wds, ffcv or dali backend).
- `registry/`: MLflow: runs, registered versions, champions and their promotion, the family's comparison.
- `training/`: one job: recipes, the family's members, the Ray Train job, its loop, schedules, augmentation.
- `inference/`: using a trained model: evaluation on a split, export to ONNX, TorchScript or PT2.
- `search/`: the scaling search, the scaling study and the baseline search, as Ray Tune experiments.
- Leaves any part may use, importing nothing of the project: `settings.py` (where data and servers are),
  `atomic.py` (files written whole or not at all), `seeds.py` (one seed-mixing rule), `hashing.py` (content
  hashes), `watchdog.py`.

Imports run one way (tests/unit/test_layout.py): staging -> source and dataset; loading -> dataset;
registry -> models; training -> registry, loading, dataset, models; inference and search -> training and what it
uses. `models/` imports only torch.
"""
