"""Checkpoint files read back without unpickling: the two layouts the project writes, and every way a file can
fail to be what it claims, each a one-line error."""

from __future__ import annotations

import pytest
import torch

import models
from models.checkpoint import ModelError, model_from_checkpoint, read_checkpoint, scored_weights
from pipelines.inference.export import export_model
from pipelines.registry.model_ref import LoadedModel, load_file, parse_model_uri

ARGS = {"name": "efficientnet_b0", "phi": -9, "num_classes": 3}


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.create_model("efficientnet_b0", phi=-9, num_classes=3).eval()


def test_a_registered_state_dict_and_a_training_checkpoint_rebuild_their_model(tmp_path) -> None:
    weights, ema = _model(0), _model(1)
    torch.save({"state_dict": weights.state_dict(), "model_args": ARGS}, tmp_path / "state_dict.pt")
    torch.save({"model": weights.state_dict(), "ema": ema.state_dict(), "optimizer": {}, "loop": {"epoch": 3},
                "model_args": ARGS}, tmp_path / "checkpoint.pt")
    x = torch.randn(2, 3, 64, 64)
    registered = load_file(tmp_path / "state_dict.pt")
    assert registered.spec.name == "efficientnet_b0_phi-9" and registered.num_classes == 3
    assert torch.equal(registered.model(x), weights(x))
    assert torch.equal(load_file(tmp_path / "checkpoint.pt").model(x), ema(x))  # the EMA: what training scored


def test_the_scored_weights_are_the_emas_when_there_is_one(tmp_path) -> None:
    model, ema = _model(0), _model(1)
    assert scored_weights({"model": model, "ema": ema}) is ema  # a training worker's live pair
    assert scored_weights({"model": model, "ema": None}) is model
    torch.save({"model": model.state_dict(), "ema": None, "loop": {"epoch": 1}}, tmp_path / "checkpoint.pt")
    saved = read_checkpoint(tmp_path / "checkpoint.pt", device="meta")  # tensors where the caller asks
    assert scored_weights(saved).keys() == model.state_dict().keys()
    assert all(t.device.type == "meta" for t in scored_weights(saved).values())


def test_a_file_that_holds_a_pickled_object_is_refused_not_loaded(tmp_path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "model_args": ARGS, "hook": Exception("runs on load")}, path)
    with pytest.raises(ModelError, match="not a plain checkpoint: it holds pickled objects, which are never loaded"):
        read_checkpoint(path)


@pytest.mark.parametrize("saved, message", [
    ({"model_args": ARGS}, "holds no weights"),
    ({"state_dict": {}}, "holds no model_args"),
    ({"state_dict": {}, "model_args": {**ARGS, "name": "efficientnet_b99"}}, "do not describe a model"),
    ({"state_dict": {"x": 1}, "model_args": ARGS}, "not a dict of tensors"),
    ({"state_dict": _model(0).state_dict(), "model_args": {**ARGS, "num_classes": 5}},
     "do not fit efficientnet_b0_phi-9 with 5 classes: size mismatch"),
])
def test_a_checkpoint_that_is_not_what_it_claims_is_a_clear_error(saved, message) -> None:
    with pytest.raises(ModelError, match=message) as info:
        model_from_checkpoint(saved, "f.pt")
    assert "\n" not in str(info.value)


def test_not_a_checkpoint_file(tmp_path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="not a checkpoint file"):
        read_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(ModelError, match="no such checkpoint file"):
        load_file(tmp_path / "missing.pt")
    with pytest.raises(ModelError, match="expected models:/NAME/VERSION"):
        parse_model_uri("models:/b0")


def test_an_export_in_an_unknown_format_or_to_a_missing_folder_is_refused(tmp_path) -> None:
    spec = models.resolve_variant("efficientnet_b0", phi=-9)
    loaded = LoadedModel(_model(0), spec, 3, "test", None)
    with pytest.raises(ValueError, match="format must be one of onnx, torchscript, pt2"):
        export_model(loaded, "tflite", tmp_path / "m.tflite")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        export_model(loaded, "onnx", tmp_path / "nowhere" / "m.onnx")


# --- fine-tuning's layer-wise freezing ---


def test_the_frozen_part_is_the_stem_and_the_first_stages_or_all_but_the_classifier() -> None:
    net = _model(0)
    assert models.frozen_part(net, 0) == []
    assert models.frozen_part(net, 2) == [net.stem, net.stages[0], net.stages[1]]
    backbone = {id(p) for m in models.frozen_part(net, "backbone") for p in m.parameters()}
    assert backbone == {id(p) for n, p in net.named_parameters() if not n.startswith("classifier.")}
    with pytest.raises(ValueError, match="number of stages in 0..7"):
        models.frozen_part(net, 8)


def test_frozen_modules_keep_their_weights_and_bn_statistics_only_for_the_first_epochs() -> None:
    from types import SimpleNamespace

    from pipelines.training.recipe import load_recipe
    from pipelines.training.loop import frozen_parameters

    recipe = load_recipe("demo").with_overrides(init={"from": "models:/x/1", "freeze": 1, "freeze_epochs": 2})
    net = _model(0).train()
    worker = SimpleNamespace(recipe=recipe, model=net)
    frozen = frozen_parameters(worker, epoch=1)
    assert {id(p) for p in frozen} == {id(p) for m in (net.stem, net.stages[0]) for p in m.parameters()}
    assert not net.stem.training and not net.stages[0].training and net.stages[1].training  # BN: running stats
    net.train()
    assert frozen_parameters(worker, epoch=2) == [] and net.stem.training
    with pytest.raises(ValueError, match="go together"):
        recipe.with_overrides(init={"from": "models:/x/1", "freeze": 1, "freeze_epochs": 0})
