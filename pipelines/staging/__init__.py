"""Staging: an ILSVRC2012 source -> checked RGB images -> minival hold-out -> one dataset version of WebDataset
shards per resolution tier (optionally FFCV files and DALI indexes), resumable and incremental; `stager.stage`
is the entry, the `stage-imagenet` flow and `effnet stage` its callers.

Modules, in the order the data goes through them:
- `params`: StageParams (what a run is asked for, checked once) and the numbers and names that version its files.
- `images`: one image decoded, checked, made upright RGB and encoded at every tier.
- `spools`: units (a train class, a val chunk), each decoded once into a spool in the work folder.
- `catalog`: the units' records read back into columns, a row per image (bytes, not a dict, per image).
- `plan`: the minival hold-out, the shuffles and the cut into shards: which image goes where.
- `shards`: the WebDataset shards, copied from the spools, each with its checksum sidecar.
- `ffcv_files`: the "ffcv" format, a `.beton` per tier and split.
- `dali_index`: the "dali" format, an index beside every shard.
- `versions`: version names, finished versions, the base of an incremental version, the keys and the manifest.
- `runners`: how units and shards run (threads or processes, mappers, progress, the number of workers).
- `stager`: `stage`, which sequences all of the above, and the work folder's housekeeping.
"""
