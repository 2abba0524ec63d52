"""Deployment: latency and generation benchmarks (``bench``), ONNX export and int8 quantization
(``export``) and evaluation on ONNX Runtime (``onnxrt``). Sits above the methods and below the
pipeline and the entry points."""
