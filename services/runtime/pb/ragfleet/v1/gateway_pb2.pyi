from services.runtime.pb.ragfleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CacheStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CACHE_STATUS_UNSPECIFIED: _ClassVar[CacheStatus]
    CACHE_STATUS_MISS: _ClassVar[CacheStatus]
    CACHE_STATUS_HIT_EXACT: _ClassVar[CacheStatus]
    CACHE_STATUS_HIT_SEMANTIC: _ClassVar[CacheStatus]
    CACHE_STATUS_BYPASS: _ClassVar[CacheStatus]
CACHE_STATUS_UNSPECIFIED: CacheStatus
CACHE_STATUS_MISS: CacheStatus
CACHE_STATUS_HIT_EXACT: CacheStatus
CACHE_STATUS_HIT_SEMANTIC: CacheStatus
CACHE_STATUS_BYPASS: CacheStatus

class AskRequest(_message.Message):
    __slots__ = ("question", "top_k", "filters", "conversation_id", "params", "bypass_cache", "mode")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    BYPASS_CACHE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    question: str
    top_k: int
    filters: _containers.RepeatedCompositeFieldContainer[_common_pb2.FieldCondition]
    conversation_id: str
    params: _common_pb2.GenerationParams
    bypass_cache: bool
    mode: _common_pb2.SearchMode
    def __init__(self, question: _Optional[str] = ..., top_k: _Optional[int] = ..., filters: _Optional[_Iterable[_Union[_common_pb2.FieldCondition, _Mapping]]] = ..., conversation_id: _Optional[str] = ..., params: _Optional[_Union[_common_pb2.GenerationParams, _Mapping]] = ..., bypass_cache: _Optional[bool] = ..., mode: _Optional[_Union[_common_pb2.SearchMode, str]] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("cache_ms", "embed_ms", "retrieve_ms", "rerank_ms", "first_token_ms", "total_ms", "history_ms")
    CACHE_MS_FIELD_NUMBER: _ClassVar[int]
    EMBED_MS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVE_MS_FIELD_NUMBER: _ClassVar[int]
    RERANK_MS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_MS_FIELD_NUMBER: _ClassVar[int]
    cache_ms: float
    embed_ms: float
    retrieve_ms: float
    rerank_ms: float
    first_token_ms: float
    total_ms: float
    history_ms: float
    def __init__(self, cache_ms: _Optional[float] = ..., embed_ms: _Optional[float] = ..., retrieve_ms: _Optional[float] = ..., rerank_ms: _Optional[float] = ..., first_token_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., history_ms: _Optional[float] = ...) -> None: ...

class Sources(_message.Message):
    __slots__ = ("passages",)
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    passages: _containers.RepeatedCompositeFieldContainer[_common_pb2.Passage]
    def __init__(self, passages: _Optional[_Iterable[_Union[_common_pb2.Passage, _Mapping]]] = ...) -> None: ...

class AskFinished(_message.Message):
    __slots__ = ("finish_reason", "usage", "cache_status", "timings", "model", "conversation_id", "fallback_used", "trace_id")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    CACHE_STATUS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_USED_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    cache_status: CacheStatus
    timings: StageTimings
    model: str
    conversation_id: str
    fallback_used: bool
    trace_id: str
    def __init__(self, finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., cache_status: _Optional[_Union[CacheStatus, str]] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., model: _Optional[str] = ..., conversation_id: _Optional[str] = ..., fallback_used: _Optional[bool] = ..., trace_id: _Optional[str] = ...) -> None: ...

class AskResponse(_message.Message):
    __slots__ = ("sources", "delta", "finished")
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    sources: Sources
    delta: _common_pb2.TextDelta
    finished: AskFinished
    def __init__(self, sources: _Optional[_Union[Sources, _Mapping]] = ..., delta: _Optional[_Union[_common_pb2.TextDelta, _Mapping]] = ..., finished: _Optional[_Union[AskFinished, _Mapping]] = ...) -> None: ...

class Document(_message.Message):
    __slots__ = ("doc_id", "title", "text", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    doc_id: str
    title: str
    text: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, doc_id: _Optional[str] = ..., title: _Optional[str] = ..., text: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class IngestRequest(_message.Message):
    __slots__ = ("documents", "chunk_tokens", "chunk_overlap")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    chunk_tokens: int
    chunk_overlap: int
    def __init__(self, documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ..., chunk_tokens: _Optional[int] = ..., chunk_overlap: _Optional[int] = ...) -> None: ...

class IngestResponse(_message.Message):
    __slots__ = ("documents", "chunks_written", "corpus_version")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    CORPUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    documents: int
    chunks_written: int
    corpus_version: int
    def __init__(self, documents: _Optional[int] = ..., chunks_written: _Optional[int] = ..., corpus_version: _Optional[int] = ...) -> None: ...

class DeleteDocumentsRequest(_message.Message):
    __slots__ = ("doc_ids",)
    DOC_IDS_FIELD_NUMBER: _ClassVar[int]
    doc_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, doc_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteDocumentsResponse(_message.Message):
    __slots__ = ("deleted_chunks", "corpus_version")
    DELETED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CORPUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    deleted_chunks: int
    corpus_version: int
    def __init__(self, deleted_chunks: _Optional[int] = ..., corpus_version: _Optional[int] = ...) -> None: ...
