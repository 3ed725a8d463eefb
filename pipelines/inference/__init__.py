"""Using a trained model: its evaluation on a staged split (`evaluation`: `effnet eval`) and its export to a file
another runtime loads (`export`: `effnet export`, ONNX, TorchScript or PT2, each file run and compared).

The model itself comes from the registry (`pipelines.registry.model_ref`); nothing is unpickled.
"""

EXPORT_FORMATS = ("onnx", "torchscript", "pt2")  # `effnet export --format`
