"""The three rerankers: fusion rescoring, a real HTTP TEI-compatible endpoint, a tiny ONNX cross-encoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from aiohttp import web

from services.retrieval.models import Candidate
from services.retrieval.rerank import FusionRescorer, OnnxCrossEncoder, RerankQuery, TeiReranker, build_reranker
from services.retrieval.config import RerankConfig
from services.runtime.errors import ConfigError, Unavailable


def cand(pid: str, text: str, vector=None) -> Candidate:
    return Candidate(pid, 0.0, {"text": text}, None if vector is None else np.asarray(vector, dtype=np.float32))


async def test_fusion_rescorer_blends_cosine_and_bm25():
    q = np.array([1.0, 0.0])
    cands = [cand("lexical", "x", [0.0, 1.0]), cand("semantic", "y", [1.0, 0.0]), cand("both", "z", [0.8, 0.6])]
    lexical = {"lexical": 10.0, "both": 6.0}
    dense_only = await FusionRescorer(1.0).rerank(RerankQuery("q", q, lexical), cands)
    lexical_only = await FusionRescorer(0.0).rerank(RerankQuery("q", q, lexical), cands)
    blended = await FusionRescorer(0.5).rerank(RerankQuery("q", q, lexical), cands)
    assert [c.point_id for c in dense_only] == ["semantic", "both", "lexical"]
    assert [c.point_id for c in lexical_only] == ["lexical", "both", "semantic"]
    assert blended[0].point_id == "both"
    assert blended[0].score == pytest.approx(0.5 * (0.8 / 1.0) + 0.5 * 0.6)


async def test_fusion_rescorer_without_query_vector_uses_bm25():
    out = await FusionRescorer(0.7).rerank(RerankQuery("q", None, {"b": 2.0, "a": 1.0}), [cand("a", ""), cand("b", "")])
    assert [c.point_id for c in out] == ["b", "a"]


@pytest.fixture
async def tei_server():
    """A real HTTP server speaking TEI's /rerank: score = how many query words the text contains."""
    seen: list[dict] = []

    async def rerank(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        if body["query"] == "boom":
            return web.Response(status=500, text="model crashed")
        words = set(body["query"].split())
        ranked = [{"index": i, "score": float(sum(w in words for w in t.split()))} for i, t in enumerate(body["texts"])]
        ranked.sort(key=lambda r: -r["score"])
        return web.Response(text=json.dumps(ranked), content_type="application/json")

    app = web.Application()
    app.router.add_post("/rerank", rerank)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", seen
    await runner.cleanup()


async def test_tei_reranker_against_http_server(tei_server):
    url, seen = tei_server
    reranker = TeiReranker(url, 2.0)
    try:
        cands = [cand("a", "nothing here"), cand("b", "red apple pie"), cand("c", "apple")]
        out = await reranker.rerank(RerankQuery("red apple", None), cands)
        assert [c.point_id for c in out] == ["b", "c", "a"]
        assert [c.score for c in out] == [2.0, 1.0, 0.0]
        assert seen[0]["texts"] == ["nothing here", "red apple pie", "apple"] and seen[0]["query"] == "red apple"
        with pytest.raises(Unavailable, match="reranker at .*/rerank"):
            await reranker.rerank(RerankQuery("boom", None), cands)
    finally:
        await reranker.close()


async def test_tei_reranker_down_is_unavailable():
    reranker = TeiReranker("http://127.0.0.1:9", 0.5)
    with pytest.raises(Unavailable):
        await reranker.rerank(RerankQuery("q", None), [cand("a", "x")])
    await reranker.close()


def build_tiny_cross_encoder(directory) -> None:
    """A bag-of-words 'cross-encoder': logit = sum over the pair's tokens of a per-token weight ('apple' = 1)."""
    import onnx
    from onnx import TensorProto, helper
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[UNK]": 0, "[PAD]": 1, "[CLS]": 2, "[SEP]": 3, "apple": 4, "pie": 5, "red": 6, "car": 7, "fast": 8}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer.enable_padding(pad_id=1, pad_token="[PAD]")
    tokenizer.save(str(directory / "tokenizer.json"))
    weights = np.zeros(len(vocab), dtype=np.float32)
    weights[vocab["apple"]] = 1.0
    weights[vocab["pie"]] = 0.5
    graph = helper.make_graph(
        [helper.make_node("Gather", ["w", "input_ids"], ["per_token"]),
         helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["per_token", "mask"], ["masked"]),
         helper.make_node("ReduceSum", ["masked", "axes"], ["logits"], keepdims=1)],
        "tiny_cross_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1])],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, [len(vocab)], weights.tolist()),
                     helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(directory / "model.onnx"))


async def test_onnx_cross_encoder_from_operator_directory(tmp_path):
    build_tiny_cross_encoder(tmp_path)
    reranker = build_reranker(RerankConfig(kind="onnx", model_dir=str(tmp_path)))
    assert isinstance(reranker, OnnxCrossEncoder)
    cands = [cand("car", "fast red car"), cand("pie", "apple pie apple"), cand("apple", "red apple")]
    out = await reranker.rerank(RerankQuery("apple", None), cands)
    assert [c.point_id for c in out] == ["pie", "apple", "car"]
    # query 'apple' contributes 1 to every pair; padding (batch of different lengths) contributes nothing.
    assert [c.score for c in out] == pytest.approx([3.5, 2.0, 1.0])
    await reranker.close()


def test_onnx_cross_encoder_missing_files_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="model.onnx"):
        OnnxCrossEncoder(str(tmp_path))


async def test_fusion_rescorer_takes_the_dense_legs_cosines_and_needs_vectors_only_for_the_rest():
    q = np.array([1.0, 0.0])
    lexical = {"lexical": 10.0, "both": 6.0}
    # "semantic" and "both" came back from the dense leg (their cosines are known); "lexical" did not: its vector.
    cands = [cand("lexical", "x", [0.0, 1.0]), cand("semantic", "y"), cand("both", "z")]
    query = RerankQuery("q", q, lexical, dense={"semantic": 1.0, "both": 0.8})
    with_vectors = [cand("lexical", "x", [0.0, 1.0]), cand("semantic", "y", [1.0, 0.0]), cand("both", "z", [0.8, 0.6])]
    for alpha in (1.0, 0.5):
        mixed = await FusionRescorer(alpha).rerank(query, cands)
        stored = await FusionRescorer(alpha).rerank(RerankQuery("q", q, lexical), with_vectors)
        assert [(c.point_id, round(c.score, 6)) for c in mixed] == [(c.point_id, round(c.score, 6)) for c in stored]
    # A candidate with neither a dense score nor a vector: no cosine for anyone, BM25 decides.
    out = await FusionRescorer(1.0).rerank(RerankQuery("q", q, lexical, dense={"semantic": 1.0}),
                                           [cand("lexical", "x"), cand("semantic", "y")])
    assert [c.point_id for c in out] == ["lexical", "semantic"]
