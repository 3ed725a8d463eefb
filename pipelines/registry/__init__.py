"""The MLflow side of a trained model: runs, registered versions, champions and the family's comparison.

- `tracking`: the experiment, one run per job (metrics per epoch), tag names (`Tags`), registration and aliases,
  the family's parent run.
- `promotion`: whether a new version takes `champion`, decided on minival against the champion there.
- `model_ref`: a trained model by reference (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID or a checkpoint
  file), its weights read without unpickling.
- `served_model`: the registered MLflow model, logged as code (models-from-code) beside plain weights.
- `compare`: the family (and the searches) side by side: tables, plots, pages.

It never needs training: `pipelines.training` registers through it, `pipelines.inference` reads through it.
"""
