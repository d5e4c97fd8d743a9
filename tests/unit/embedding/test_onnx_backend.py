"""The local model in both computes against the fp32 reference, and the pipeline's invariants (pooling, padding,
batch independence, truncation)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from services.embedding.backends.onnx import INT8_COMPUTE_SUFFIX, MODEL_ID, OnnxBackend, default_model_path
from services.embedding.cache import cache_key
from services.embedding.config import OnnxConfig
from services.runtime.errors import ConfigError


async def test_float32_compute_matches_fp32_reference(float32_backend, reference):
    items = float32_backend.prepare(reference["sentences"])
    vectors = await float32_backend.embed(items)
    ref = np.asarray(reference["vectors"], dtype=np.float32)
    cosines = (vectors * ref).sum(axis=1) / np.linalg.norm(ref, axis=1)
    assert len(cosines) == 24
    assert cosines.min() >= 0.999, f"worst cosine to fp32: {cosines.min():.5f}"


async def test_int8_compute_stays_close_to_fp32_reference(onnx_backend, reference):
    assert onnx_backend.config.compute == "int8"  # the default
    vectors = await onnx_backend.embed(onnx_backend.prepare(reference["sentences"]))
    ref = np.asarray(reference["vectors"], dtype=np.float32)
    cosines = (vectors * ref).sum(axis=1) / np.linalg.norm(ref, axis=1)
    # Measured: worst 0.992, median 0.995. The retrieval quality that matters: bench/results/quantization.md.
    assert cosines.min() >= 0.985, f"worst cosine to fp32: {cosines.min():.5f}"
    assert np.median(cosines) >= 0.99


async def test_unit_vectors_of_model_dimension(onnx_backend, float32_backend):
    for backend in (onnx_backend, float32_backend):
        vectors = await backend.embed(backend.prepare(["short", "a somewhat longer sentence about cells"]))
        assert vectors.shape == (2, 384) and vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        assert backend.dimension == 384
    # The two computes' vectors differ slightly: they never share a cache key.
    assert float32_backend.model_id == "all-MiniLM-L6-v2-onnx-int8"
    assert onnx_backend.model_id == "all-MiniLM-L6-v2-onnx-int8-dynamic-int8"


async def test_padding_does_not_change_vectors(float32_backend, scifact_texts):
    texts = scifact_texts[:12]  # mixed lengths: each batch is padded to its longest text
    items = float32_backend.prepare(texts)
    assert len({i.token_count for i in items}) > 3
    together = await float32_backend.embed(items)
    alone = np.stack([(await float32_backend.embed([item]))[0] for item in items])
    assert np.abs(together - alone).max() < 1e-4


async def test_int8_vectors_do_not_depend_on_the_batch(onnx_backend, scifact_texts):
    """Activations are quantised per tensor: run as one batch, a text's vector moved by ~2e-2 with its neighbours
    (cosine 0.992). Each text runs alone, so the vector is the same bytes in any batch and from any replica."""
    items = onnx_backend.prepare(scifact_texts[:12])
    assert onnx_backend.pads_batches is False and onnx_backend.max_in_flight >= 1
    together = await onnx_backend.embed(items)
    alone = np.stack([(await onnx_backend.embed([item]))[0] for item in items])
    np.testing.assert_array_equal(together, alone)


async def test_long_text_truncated_at_256_tokens(onnx_backend):
    long_text = "mitochondria " * 400
    item, short = onnx_backend.prepare([long_text, "mitochondria"])
    assert item.truncated and item.token_count == 256
    assert not short.truncated and short.token_count == 6  # [CLS] mit ##och ##ond ##ria [SEP]
    vector = (await onnx_backend.embed([item]))[0]
    assert np.isfinite(vector).all()


async def test_thread_spinning_is_off_unless_configured(onnx_backend):
    from services.embedding.backends.onnx import default_model_path, load_session
    from services.embedding.config import EmbeddingConfig

    key = "session.intra_op.allow_spinning"
    # Spinning threads would steal the cores the event loop and neighbouring services need between batches.
    assert onnx_backend._session.get_session_options().get_session_config_entry(key) == "0"
    spinning = load_session(default_model_path(), 1, allow_spinning=True)
    assert spinning.get_session_options().get_session_config_entry(key) == "1"
    assert EmbeddingConfig.from_env({}).onnx.allow_spinning is False
    assert EmbeddingConfig.from_env({"RAGFLEET_EMBEDDING_ONNX_SPIN": "true"}).onnx.allow_spinning is True


def test_custom_model_path_gets_a_model_id_of_its_own(tmp_path):
    """The model id is part of every cache key and the response's `model`: another model must not share it."""
    def model_id(path) -> str:
        return OnnxBackend(OnnxConfig(model_path=str(path))).model_id

    replica_a, replica_b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    shutil.copyfile(default_model_path(), replica_a)
    shutil.copyfile(default_model_path(), replica_b)
    other = tmp_path / "other.onnx"
    other.write_bytes(replica_a.read_bytes()[:-1] + b"\x00")  # stands in for a fine-tuned model: other bytes

    assert OnnxBackend(OnnxConfig(compute="float32")).model_id == MODEL_ID
    assert OnnxBackend(OnnxConfig()).model_id == MODEL_ID + INT8_COMPUTE_SUFFIX
    custom = model_id(replica_a)
    assert custom.startswith(MODEL_ID) and custom != MODEL_ID
    assert model_id(replica_b) == custom  # content, not path: replicas with their own copy share the L2 cache
    assert model_id(other) not in (custom, MODEL_ID)
    assert cache_key(model_id(other), 1, "q") != cache_key(custom, 1, "q")
    with pytest.raises(ConfigError, match="RAGFLEET_EMBEDDING_ONNX_MODEL_PATH"):
        model_id(tmp_path / "missing.onnx")


@pytest.mark.parametrize("cpu_max, cap", [
    (None, None),                 # no cgroup v2 file: the affinity mask alone
    ("max 100000\n", None),       # no quota
    ("100000 100000\n", 1),       # one CPU's worth
    ("150000 100000\n", 2),       # 1.5 CPUs: a second thread still gets half a core
    ("20000 100000\n", 1),        # a fraction of a CPU is still one thread
    ("garbage\n", None),          # unreadable: ignored, not fatal
])
def test_usable_cpus_follow_affinity_and_the_cgroup_quota(tmp_path, cpu_max, cap):
    import os

    from services.embedding.config import usable_cpus

    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(str(path)) == (affinity if cap is None else min(affinity, cap))


async def test_the_session_runs_the_configured_intra_op_threads(onnx_backend, float32_backend):
    from services.embedding.backends.onnx import load_session
    from services.embedding.config import usable_cpus

    assert float32_backend.config.intra_op_threads == 0  # the default: one thread per usable CPU
    assert float32_backend._session.get_session_options().intra_op_num_threads == usable_cpus()
    # int8: one thread per run, as many runs at once as there are usable CPUs
    assert onnx_backend._session.get_session_options().intra_op_num_threads == 1
    assert onnx_backend.max_in_flight == usable_cpus()
    assert OnnxConfig(intra_op_threads=3).threads == 3
    pinned = load_session(default_model_path(), OnnxConfig(intra_op_threads=1).threads)
    assert pinned.get_session_options().intra_op_num_threads == 1


def test_usable_cpus_follow_the_affinity_mask_not_the_core_count(tmp_path):
    import os
    from concurrent.futures import ThreadPoolExecutor

    from services.embedding.config import usable_cpus

    def pinned_to_one_cpu() -> int:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # this worker thread only (Linux: 0 = caller)
        return usable_cpus(str(tmp_path / "no-cgroup"))

    with ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(pinned_to_one_cpu).result() == 1


def test_the_int8_model_is_built_once_and_keyed_by_its_source(tmp_path):
    from services.embedding.backends.quantize import cache_name, quantized_model

    source = tmp_path / "model.onnx"
    shutil.copyfile(default_model_path(), source)
    cache = tmp_path / "cache"
    built = quantized_model(str(source), str(cache))
    first_mtime = (cache / built.rsplit("/", 1)[1]).stat().st_mtime_ns
    assert quantized_model(str(source), str(cache)) == built  # the second start loads it, no rebuild
    assert (cache / built.rsplit("/", 1)[1]).stat().st_mtime_ns == first_mtime
    assert [p.name for p in cache.iterdir()] == [built.rsplit("/", 1)[1]]  # no scratch left behind
    source.write_bytes(source.read_bytes()[:-1] + b"\x00")  # other bytes: another cache entry
    assert cache_name(str(source)) not in built


def test_an_unwritable_cache_dir_falls_back_to_the_temp_dir(tmp_path, monkeypatch):
    from services.embedding.backends import quantize

    blocked = tmp_path / "a-file"
    blocked.write_text("")  # a directory cannot be made under a file, whoever runs the test (root ignores modes)
    monkeypatch.setattr(quantize, "default_cache_dir", lambda: str(tmp_path / "tmp"))
    built = quantize.quantized_model(default_model_path(), str(blocked / "onnx"))
    assert built.startswith(str(tmp_path / "tmp"))
