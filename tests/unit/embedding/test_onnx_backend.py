"""The local int8 model against the fp32 reference, and the pipeline's invariants (pooling, padding, truncation)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from services.embedding.backends.onnx import MODEL_ID, OnnxBackend, default_model_path
from services.embedding.cache import cache_key
from services.embedding.config import OnnxConfig
from services.runtime.errors import ConfigError


async def test_matches_fp32_reference(onnx_backend, reference):
    items = onnx_backend.prepare(reference["sentences"])
    vectors = await onnx_backend.embed(items)
    ref = np.asarray(reference["vectors"], dtype=np.float32)
    cosines = (vectors * ref).sum(axis=1) / np.linalg.norm(ref, axis=1)
    assert len(cosines) == 24
    assert cosines.min() >= 0.999, f"worst cosine to fp32: {cosines.min():.5f}"


async def test_unit_vectors_of_model_dimension(onnx_backend):
    vectors = await onnx_backend.embed(onnx_backend.prepare(["short", "a somewhat longer sentence about cells"]))
    assert vectors.shape == (2, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert onnx_backend.dimension == 384 and onnx_backend.model_id == "all-MiniLM-L6-v2-onnx-int8"


async def test_padding_does_not_change_vectors(onnx_backend, scifact_texts):
    texts = scifact_texts[:12]  # mixed lengths: each batch is padded to its longest text
    items = onnx_backend.prepare(texts)
    assert len({i.token_count for i in items}) > 3
    together = await onnx_backend.embed(items)
    alone = np.stack([(await onnx_backend.embed([item]))[0] for item in items])
    assert np.abs(together - alone).max() < 1e-4


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

    assert OnnxBackend(OnnxConfig()).model_id == MODEL_ID
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


async def test_the_session_runs_the_configured_intra_op_threads(onnx_backend):
    from services.embedding.backends.onnx import load_session
    from services.embedding.config import usable_cpus

    assert onnx_backend.config.intra_op_threads == 0  # the default: one thread per usable CPU
    assert onnx_backend._session.get_session_options().intra_op_num_threads == usable_cpus()
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
