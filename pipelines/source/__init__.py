"""Sources: where the images come from, as undecoded bytes with their labels (staging decodes them).

- `imagenet`: ILSVRC2012 in the layouts users hold it in (the distributed archives, an extracted tree, Kaggle's
  layout), indexed without extracting and split into picklable units that a worker process can read alone.
  `open_source` is the entry and the names callers use live there; behind it:
  - `records`: the source type every layout gives (`ImageNetSource`), its units and records, and their readers;
  - `archives`, `tree`, `kaggle`: indexing each layout; `devkit`: the devkit's classes and val labels.
- `demo`: a small, learnable ImageNet written in the exact ILSVRC2012 archive format (for the demo and the
  tests), and its extraction into the other layouts.
"""
