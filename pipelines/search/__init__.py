"""The papers' searches at proxy scale, each one Ray Tune experiment of short trainings under an MLflow parent run.

- `trials`: the Tune trials (one process each, the training loop's own epoch), the scaling grid and the study's
  members at equal FLOPs, each trial's folder for a rerun after a crash.
- `experiment`: what the scaling search, the scaling study and the baseline search share around their trials:
  checks, the parent run, rows, files, the winner stored, the study's verdict.
- `baseline`: the baseline search (random search or evolution over `models.search_space`), its rewards.
"""
