"""`effnet export`: a trained model (`pipelines.registry.model_ref`) as an ONNX, TorchScript or PT2
(`torch.export`) file, checked by running the written file and comparing its logits with the PyTorch model's.

The check runs the file as its users would: ONNX through onnxruntime, TorchScript through `torch.jit.load`,
PT2 through `torch.export.load`, on a batch of another size than the one exported with (the batch dimension is
dynamic). A file whose logits differ by more than the tolerance is removed and the export fails; a file is
written whole or not at all.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.atomic import atomic_path
from pipelines.inference import EXPORT_FORMATS
from pipelines.registry.model_ref import LoadedModel, ModelError

# Largest |logit difference| accepted between the file and the PyTorch model, relative to the logits' scale:
# TOLERANCE x (1 + the largest |logit|). In float32 on the CPU kernels differ in summation order (ONNX Runtime
# fuses conv + BN): measured up to 1.2e-4 on a trained demo model whose logits reach ~10.
TOLERANCE = 1e-4
EXPORT_BATCH, CHECK_BATCH = 2, 3


def _example(loaded: LoadedModel, batch: int, seed: int) -> torch.Tensor:
    r = loaded.spec.eval_resolution
    return torch.randn(batch, 3, r, r, generator=torch.Generator().manual_seed(seed))


def _write_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    # The exporter prints its progress and warns that torchvision's detection ops are not there to register.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), _quiet("torch.onnx"):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            external_data=False,
        )


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _write_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():  # TorchScript's deprecation notice
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, example), str(path))


def _run_torchscript(path: Path, x: torch.Tensor) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu")(x).detach().numpy()


def _write_pt2(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    with open(path, "wb") as f:  # a file object: torch warns about a path whose name does not end in .pt2
        torch.export.save(program, f)


def _run_pt2(path: Path, x: torch.Tensor) -> np.ndarray:
    with open(path, "rb") as f:
        return torch.export.load(f).module()(x).detach().numpy()


WRITERS: dict[str, tuple[Callable[..., None], Callable[[Path, torch.Tensor], np.ndarray]]] = {
    "onnx": (_write_onnx, _run_onnx),
    "torchscript": (_write_torchscript, _run_torchscript),
    "pt2": (_write_pt2, _run_pt2),
}


def export_model(loaded: LoadedModel, fmt: str, out: str | Path, tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Write `loaded` to `out` in `fmt`, run the file, compare; a report (format, file, the largest logit
    difference, the difference allowed: `tolerance` x (1 + the largest |logit|)). ModelError when the file's
    outputs differ by more (no file left behind)."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, not {fmt!r}")
    out = Path(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: no such directory to write {out.name} in")
    write, run = WRITERS[fmt]
    model = loaded.model.eval().cpu()
    check = _example(loaded, CHECK_BATCH, seed=1)
    with torch.no_grad():
        expected = model(check).numpy()
    with atomic_path(out) as tmp:
        write(model, _example(loaded, EXPORT_BATCH, seed=0), tmp)
        got = run(tmp, check)
        diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
        allowed = tolerance * (1 + float(np.abs(expected).max()))
        if not diff <= allowed:
            raise ModelError(
                f"{loaded.source} as {fmt}: the file's logits differ from the model's by {diff:.3g} "
                f"(allowed {allowed:.3g}; shapes {tuple(got.shape)} vs {tuple(expected.shape)}); "
                "nothing written"
            )
    return {
        "model": loaded.source,
        "variant": loaded.spec.name,
        "format": fmt,
        "file": str(out),
        "bytes": out.stat().st_size,
        "max_abs_diff": diff,
        "allowed": allowed,
        "checked_batch": CHECK_BATCH,
        "input": [CHECK_BATCH, 3, loaded.spec.eval_resolution, loaded.spec.eval_resolution],
    }


def attach_export(tracking_uri: str, loaded: LoadedModel, report: dict[str, Any]) -> str:
    """The exported file logged to the model's training run (`export/<file>`), its registered version (when the
    model was named by one) tagged `export.<format>` with the artifact's path; the artifact path."""
    from pipelines.registry import tracking
    from pipelines.registry.model_ref import parse_model_uri

    if loaded.run_id is None:
        raise ModelError(f"{loaded.source}: a checkpoint file has no MLflow run to attach the export to")
    c = tracking.client(tracking_uri)
    c.log_artifact(loaded.run_id, report["file"], "export")
    artifact = f"export/{Path(report['file']).name}"
    if loaded.source.startswith("models:/"):
        name, version, _ = parse_model_uri(loaded.source)
        c.set_model_version_tag(name, version, f"export.{report['format']}", artifact)
    return artifact
