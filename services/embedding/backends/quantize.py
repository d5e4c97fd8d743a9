"""The int8-compute variant of the packaged model: built from it once per machine, then loaded from a disk cache.

The packaged all-MiniLM-L6-v2 stores int8 weights but computes in float32: onnxruntime folds every weight back to
float at load, and 60 % of a query's time is float32 MatMul. Quantising those MatMuls dynamically (int8 activations,
per-channel int8 weights; VNNI/AMX kernels where the CPU has them) makes a 22-token query about 3x cheaper and a
256-token chunk about 2x, at nearly the same retrieval quality (SciFact test, exact dense search: nDCG@10 0.6444 against
0.6468; `python -m bench.quantization`). Activations are quantised per tensor, so a text's vector would depend on
what shares its batch (cosine 0.992 between the same text alone and beside others): the backend runs each text on
its own.

    path = quantized_model(source_path, cache_dir)   # ~2 s the first time, a stat() after
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import onnxruntime as ort

from services.runtime.errors import ConfigError

log = logging.getLogger("ragfleet.embedding.quantize")

#: Bumped when the recipe below changes, so a cached file from an older recipe is never loaded.
RECIPE = "dynamic-int8-v1"


def default_cache_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "ragfleet-onnx")


def cache_name(source: str) -> str:
    """Names the source's bytes, the recipe and the onnxruntime and onnx that quantised it: any change makes a new
    file."""
    with open(source, "rb") as handle:
        digest = hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=8)).hexdigest()
    import onnx

    return f"{Path(source).stem}-{digest}-ort{ort.__version__}-onnx{onnx.__version__}-{RECIPE}.onnx"


def quantized_model(source: str, cache_dir: str | None = None) -> str:
    """Path of the int8-compute model for `source`, building it into `cache_dir` if it is not there yet. Several
    replicas starting at once may each build it; the last rename wins and every copy is the same bytes. A cache dir
    that cannot be written (a read-only image without the prebuilt file) falls back to the temp dir."""
    name = cache_name(source)
    for directory in dict.fromkeys([Path(cache_dir or default_cache_dir()), Path(default_cache_dir())]):
        target = directory / name
        if target.is_file():
            return str(target)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as scratch:
                os.replace(build(source, Path(scratch)), target)
        except OSError as exc:
            log.warning("cannot build the int8 model here", extra={"fields": {"dir": str(directory),
                                                                             "error": str(exc)}})
            continue
        log.info("built the int8-compute model", extra={"fields": {"source": source, "path": str(target)}})
        return str(target)
    raise ConfigError(f"cannot write the int8-compute model to {cache_dir or default_cache_dir()} or the temp dir: "
                      "set RAGFLEET_EMBEDDING_ONNX_CACHE_DIR to a writable directory, or "
                      "RAGFLEET_EMBEDDING_ONNX_COMPUTE=float32")


def build(source: str, scratch: Path) -> Path:
    """Fold the int8 weights into float constants (onnxruntime's basic, hardware-independent rewrites), then
    quantise every MatMul dynamically with per-channel weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folded, quantized = scratch / "folded.onnx", scratch / "quantized.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folded)
    options.log_severity_level = 3
    ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
    quantize_dynamic(folded, quantized, weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul"])
    return quantized


if __name__ == "__main__":  # the Dockerfile builds it into the image: pods then start without the ~2 s build
    import sys

    from services.embedding.backends.onnx import default_model_path

    print(quantized_model(default_model_path(), sys.argv[1] if len(sys.argv) > 1 else None))
