"""Sources: where the images come from, as undecoded bytes with their labels (staging decodes them).

`open_source(path, kind=None)` (from `kinds`) detects what a folder holds and indexes it, without extracting
anything, into a `records.Source` whose picklable units a worker process can read alone:

- `records`: the source type every kind gives (`Source`), its units and records, safe keys, the shared checks;
- ILSVRC2012 in the layouts users hold it in: `archives`, `tree`, `kaggle` (and `devkit`), opened by `imagenet`;
- `folders`: a plain class-folder tree (ImageFolder's layout); `imagenet21k`: ImageNet-21k's whole tar;
  `cifar`: the CIFAR-10/100 binary archives; `flowers`: Flowers-102; `cars`: Stanford Cars; `idx`: the MNIST
  family's idx files;
- `demo`: a small, learnable ImageNet written in the exact ILSVRC2012 archive format (for the demo and the
  tests), and its extraction into the other layouts; `samples`: small archives in each other kind's exact format.
"""

from pipelines.source.kinds import detect_source_kind, open_source

__all__ = ["detect_source_kind", "open_source"]
