"""CLIP's text tower (Radford et al. 2021, §2.4): a causal transformer over BPE tokens whose
feature is the final layer-normed activation at the end-of-text token, linearly projected.

tokens [B, L] -> token embedding + learned positions -> `layers` pre-LN blocks (causal
self-attention, GELU MLP of 4 x width) -> LayerNorm -> the row at each text's end token (the
largest token id, CLIP's argmax pooling) -> [B, width] @ text_projection [width, embed_dim].
Parameter names and initialisation follow open_clip's TextTransformer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastssl.validation import check_int


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.in_proj(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """CLIP's text encoder: forward(tokens int [B, context_length]) -> float [B, embed_dim].

    vocab_size 49,408 and context_length 77 are CLIP's (open_clip's SimpleTokenizer); width 512,
    layers 12, heads 8 its ViT-B text tower."""

    def __init__(self, *, embed_dim: int, vocab_size: int = 49_408, context_length: int = 77,
                 width: int = 512, layers: int = 12, heads: int = 8):
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("vocab_size", vocab_size),
                            ("context_length", context_length), ("width", width), ("layers", layers),
                            ("heads", heads)):
            check_int(name, value, low=1)
        if width % heads:
            raise ValueError(f"text_heads must divide text_width ({width}), got {heads}")
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self._init(width, layers)

    def _init(self, width: int, layers: int) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std, proj_std, fc_std = width**-0.5, width**-0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.in_proj.weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj.bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length or tokens.is_floating_point():
            raise ValueError(f"tokens: expected integer token ids [B, {self.context_length}], got "
                             f"{tokens.dtype} {list(tokens.shape)}")
        tokens = tokens.long()
        x = self.token_embedding(tokens) + self.positional_embedding
        for block in self.blocks:
            x = block(x)
        x = self.ln_final(x)
        # the end-of-text token has the largest id: its row has attended to the whole text
        pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return pooled @ self.text_projection


__all__ = ["TextTransformer"]
