"""The servers' per-method byte limits admit the largest request their character limits accept (every string field
at its limit, in 4-byte UTF-8 characters): the guard never refuses what validation would pass."""

from __future__ import annotations

from services.generation.config import GenerationConfig
from services.generation.server import request_limits as generation_limits
from services.generation.validation import validate
from services.retrieval.config import RetrievalConfig
from services.retrieval.server import request_limits as retrieval_limits
from services.retrieval.sparse import Bm25Encoder
from services.retrieval.validation import MAX_TENANT_CHARS, Limits, upsert_records
from services.runtime import limits
from services.runtime.pb.ragfleet.v1 import common_pb2, generation_pb2, retrieval_pb2

WIDE = "\U0001F600"  # 4 bytes in UTF-8, one character


def text(chars: int) -> str:
    return WIDE * chars


def metadata() -> dict[str, str]:
    # Distinct keys, each at the key limit in 4-byte characters.
    return {chr(0x1F300 + i) + text(limits.MAX_METADATA_KEY_CHARS - 1): text(limits.MAX_METADATA_VALUE_CHARS)
            for i in range(limits.MAX_METADATA_ENTRIES)}


def test_a_maximal_upsert_passes_the_byte_limit() -> None:
    config = RetrievalConfig.from_env({"RAGFLEET_RETRIEVAL_MAX_CHUNKS_PER_UPSERT": "2"})
    dimension = config.index.dimension
    chunks = [retrieval_pb2.Chunk(chunk_id=str(i) + text(limits.MAX_CHUNK_ID_CHARS - 1),
                                  doc_id=str(i) + text(limits.MAX_DOC_ID_CHARS - 1), chunk_index=2**31 - 1 - i,
                                  title=text(limits.MAX_TITLE_CHARS), text=text(limits.MAX_CHUNK_TEXT_CHARS),
                                  vector=[-0.123456] * dimension, metadata=metadata())
              for i in range(config.search.max_chunks_per_upsert)]
    request = retrieval_pb2.UpsertRequest(tenant=text(MAX_TENANT_CHARS), chunks=chunks, replace_documents=True)
    upsert_records(request, Limits(dimension, config.search), Bm25Encoder(config.bm25))  # legitimate: validates
    assert request.ByteSize() <= retrieval_limits(config)["Upsert"]


def test_a_maximal_generate_passes_the_byte_limit() -> None:
    config = GenerationConfig.from_env({"RAGFLEET_GENERATION_MAX_PASSAGES": "2",
                                        "RAGFLEET_GENERATION_MAX_HISTORY_TURNS": "2"})
    lim = config.limits
    passages = [common_pb2.Passage(number=i + 1, chunk_id=text(limits.MAX_CHUNK_ID_CHARS),
                                   doc_id=text(limits.MAX_DOC_ID_CHARS), title=text(limits.MAX_TITLE_CHARS),
                                   text=text(lim.max_passage_chars), score=-1.5, metadata=metadata())
                for i in range(lim.max_passages)]
    history = [common_pb2.ChatTurn(role=common_pb2.ROLE_ASSISTANT, content=text(lim.max_turn_chars))
               for _ in range(lim.max_history_turns)]
    params = common_pb2.GenerationParams(model=text(limits.MAX_MODEL_CHARS), temperature=1.5,
                                         max_tokens=lim.max_tokens, top_p=0.5,
                                         stop=[text(limits.MAX_STOP_CHARS)] * limits.MAX_STOP_SEQUENCES)
    request = generation_pb2.GenerateRequest(question=text(lim.max_question_chars), passages=passages,
                                             history=history, params=params)
    validate(request, lim)  # legitimate: validates
    assert request.ByteSize() <= generation_limits(config)["Generate"]


def test_a_passage_as_long_as_a_chunk_fits_generations_default_limit() -> None:
    """Retrieval stores chunks of up to MAX_CHUNK_TEXT_CHARS and the gateway sends them on as passages."""
    assert GenerationConfig.from_env({}).limits.max_passage_chars >= limits.MAX_CHUNK_TEXT_CHARS
