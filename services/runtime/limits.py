"""Input limits shared by more than one service, and the checks that apply them.

One definition per limit, so the gateway refuses before any work (and before the first Ask event) exactly what an
internal service would refuse later, with the same wording. Limits
a user may want to change are config of the service that enforces them (see each config.py); these are the fixed
ones. Every check raises InvalidArgument naming the field: ``<field>: <n> <unit> exceeds the limit of <limit>``.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from services.runtime.errors import require
from services.runtime.guard import utf8_bytes
from services.runtime.pb.ragfleet.v1 import common_pb2

# GenerationParams (the OpenAI API accepts at most 4 stop sequences).
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_MODEL_CHARS = 256
DEFAULT_MAX_TOKENS_LIMIT = 4096  # RAGFLEET_GENERATION_MAX_TOKENS_LIMIT's default; the gateway reads that variable too
# Document and chunk identity (a chunk id is "<doc_id>#<index>", so it gets room for the suffix).
MAX_DOC_ID_CHARS = 256
MAX_CHUNK_ID_CHARS = 512
MAX_TITLE_CHARS = 1024
# One chunk's text as stored and later sent to generation as a passage (the embedding model reads ~256 tokens).
MAX_CHUNK_TEXT_CHARS = 32_768
# Metadata travels with every chunk into every matching Ask's Sources, so it is kept small.
MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY_CHARS = 128
MAX_METADATA_VALUE_CHARS = 2048
# Search filters.
MAX_FILTERS = 16
MAX_ANY_OF = 256
MAX_DOC_IDS_PER_DELETE = 10_000

# Wire sizes of fields at the limits above, for the servers' per-method request limits (services.runtime.guard):
# sized from the same numbers, a byte limit never refuses what the character checks accept.
FIELD_OVERHEAD = 16  # a field's tag and length prefix (at most 6 bytes each), rounded up


def text_bytes(chars: int) -> int:
    """The most bytes a string field of at most ``chars`` characters takes on the wire (UTF-8: 4 bytes a char)."""
    return utf8_bytes(chars) + FIELD_OVERHEAD


METADATA_BYTES = MAX_METADATA_ENTRIES * (text_bytes(MAX_METADATA_KEY_CHARS) + text_bytes(MAX_METADATA_VALUE_CHARS)
                                         + FIELD_OVERHEAD)
GENERATION_PARAMS_BYTES = (text_bytes(MAX_MODEL_CHARS) + MAX_STOP_SEQUENCES * text_bytes(MAX_STOP_CHARS)
                           + 4 * FIELD_OVERHEAD)  # + temperature, max_tokens, top_p


def chunk_bytes(text_chars: int = MAX_CHUNK_TEXT_CHARS) -> int:
    """The most bytes a Chunk or a Passage takes besides its vector: chunk id, doc id, title, metadata and a text of
    at most ``text_chars`` at their limits, plus its numbers (index or number, score) and its own prefix."""
    return (text_bytes(MAX_CHUNK_ID_CHARS) + text_bytes(MAX_DOC_ID_CHARS) + text_bytes(MAX_TITLE_CHARS)
            + text_bytes(text_chars) + METADATA_BYTES + 3 * FIELD_OVERHEAD)


def check_generation_params(params: common_pb2.GenerationParams, *, max_tokens: int,
                            field: str = "params") -> None:
    """Sampling parameters as the generation service (and the LLM behind it) will accept them."""
    require(len(params.model) <= MAX_MODEL_CHARS,
            f"{field}.model: {len(params.model)} characters exceeds the limit of {MAX_MODEL_CHARS}")
    if params.HasField("temperature"):
        require(0.0 <= params.temperature <= 2.0, f"{field}.temperature: {params.temperature:g} is outside [0, 2]")
    if params.HasField("max_tokens"):
        require(1 <= params.max_tokens <= max_tokens,
                f"{field}.max_tokens: {params.max_tokens} is outside [1, {max_tokens}]")
    if params.HasField("top_p"):
        require(0.0 < params.top_p <= 1.0, f"{field}.top_p: {params.top_p:g} is outside (0, 1]")
    require(len(params.stop) <= MAX_STOP_SEQUENCES,
            f"{field}.stop: {len(params.stop)} sequences exceeds the limit of {MAX_STOP_SEQUENCES}")
    for i, stop in enumerate(params.stop):
        require(bool(stop), f"{field}.stop[{i}]: must not be empty")
        require(len(stop) <= MAX_STOP_CHARS, f"{field}.stop[{i}]: {len(stop)} characters exceeds the limit of "
                                             f"{MAX_STOP_CHARS}")


def check_text(value: str, field: str, limit: int) -> None:
    require(len(value) <= limit, f"{field}: {len(value)} characters exceeds the limit of {limit}")


def check_metadata(metadata: Mapping[str, str], field: str) -> None:
    """Entry count and key/value sizes; metadata is copied into every hit and passage that carries it."""
    require(len(metadata) <= MAX_METADATA_ENTRIES,
            f"{field}: {len(metadata)} entries exceeds the limit of {MAX_METADATA_ENTRIES}")
    for key, value in metadata.items():
        require(bool(key), f"{field}: keys must not be empty")
        require(len(key) <= MAX_METADATA_KEY_CHARS,
                f"{field}[{key[:32]!r}...]: key of {len(key)} characters exceeds the limit of "
                f"{MAX_METADATA_KEY_CHARS}")
        require(len(value) <= MAX_METADATA_VALUE_CHARS,
                f"{field}[{key!r}]: value of {len(value)} characters exceeds the limit of "
                f"{MAX_METADATA_VALUE_CHARS}")


def check_filters(filters: Sequence[common_pb2.FieldCondition], field: str = "filters") -> None:
    """Sizes of search filters (what a filter may name is the retrieval service's business)."""
    require(len(filters) <= MAX_FILTERS, f"{field}: {len(filters)} conditions exceeds the limit of {MAX_FILTERS}")
    for i, cond in enumerate(filters):
        require(bool(cond.field), f"{field}[{i}].field: must not be empty")
        check_text(cond.field, f"{field}[{i}].field", MAX_METADATA_KEY_CHARS)
        require(len(cond.any_of) <= MAX_ANY_OF,
                f"{field}[{i}].any_of: {len(cond.any_of)} values exceeds the limit of {MAX_ANY_OF}")
        for j, value in enumerate(cond.any_of):
            check_text(value, f"{field}[{i}].any_of[{j}]", MAX_METADATA_VALUE_CHARS)
        for bound in ("gte", "lte"):
            require(not (cond.HasField(bound) and math.isnan(getattr(cond, bound))),
                    f"{field}[{i}].{bound}: must be a number, got NaN")


def check_vector(values: Sequence[float], field: str, dimension: int) -> np.ndarray:
    """A float32 vector of the right size whose norm is finite and non-zero in float32, as the engine computes it:
    finite components can still overflow the norm (3e38 each scores 0 against everything) or underflow it to 0."""
    require(len(values) == dimension, f"{field}: has {len(values)} values, expected {dimension}")
    vector = np.asarray(values, dtype=np.float32)
    require(bool(np.all(np.isfinite(vector))), f"{field}: contains NaN or infinite values")
    with np.errstate(over="ignore", under="ignore"):
        norm = float(np.sqrt(np.dot(vector, vector)))
    require(math.isfinite(norm), f"{field}: its norm overflows float32 (components up to "
                                 f"{float(np.max(np.abs(vector))):.3g}); send a normalised vector")
    require(norm > 0, f"{field}: is all zeros or too small (its norm underflows float32); cosine needs a non-zero "
                      f"vector")
    return vector
