"""Masked autoencoder ViT (He et al. 2022): the encoder runs on the kept patches only, a
lightweight decoder reconstructs the pixels of every patch.

The masking and the decoder's unshuffle are fastssl ops, the loss is fastssl.losses.MAELoss; the
constructor's `backend` picks the fused kernels ("auto") or their references ("torch") for all three.
"""

from __future__ import annotations

import numpy as np
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from fastssl import ops
from fastssl.losses.mae import MAELoss
from fastssl.models.backbones import VIT_BLOCK_OPTIONS, VIT_SIZES
from fastssl.ops.backend import BACKENDS
from fastssl.validation import check_choice


def sincos_pos_embed_2d(dim: int, grid_size: int, cls_token: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding of MAE / MoCo v3: [grid_size**2 (+1), dim].

    Half of the channels encode the row, half the column; each half is
    [sin(pos * w_k), cos(pos * w_k)] with w_k = 1 / 10000^(k / (dim/4)). The class token
    gets a row of zeros.
    """
    if dim % 4 != 0:
        raise ValueError(f"dim must be a multiple of 4 for a 2-D sin-cos embedding, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64),
                             indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    # the official code encodes its first grid axis (the column index w) in the first half
    emb = np.concatenate([encode(cols), encode(rows)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return torch.tensor(emb, dtype=torch.float32)  # on the default device: meta when a model is built there


class MaskedAutoencoderViT(nn.Module):
    """imgs [B, 3, H, W] -> (loss, pred [B, L, p*p*3], mask [B, L]); L = (H/p)^2.

    Encoder: patch embedding + fixed pos-embed, then random masking (the encoder sees
    len_keep = int(L * (1 - mask_ratio)) tokens plus the class token), ViT blocks, LayerNorm.
    Decoder: linear to decoder_dim, unshuffle with a learned mask token, fixed pos-embed,
    decoder blocks, linear prediction of each patch's pixels.
    Loss: `criterion`, the losses layer's MAELoss (the official forward_loss), which reads the
    targets from imgs in place and skips the prediction's class-token row without a slice.

    backend (keyword): "auto" (the fused kernels on CUDA), "triton" or "torch" (the references),
    for the masking, the unshuffle and the loss alike.
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        *,
        backend: str = "auto",
    ):
        super().__init__()
        self.backend = check_choice("backend", backend, BACKENDS)
        self.patch_size = patch_size
        self.criterion = MAELoss(patch_size, norm_pix_loss, backend, with_cls_token=True)
        self.patch_embed = PatchEmbed(image_size, patch_size, 3, embed_dim)
        grid = image_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, grid, cls_token=True)[None])
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)
        )
        # eps 1e-6 as the official MAE (and timm's blocks), so the encoder is exactly a timm ViT
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        decoder_pos = sincos_pos_embed_2d(decoder_dim, grid, cls_token=True)[None]
        self.register_buffer("decoder_pos_embed", decoder_pos)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio, qkv_bias=True) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size * patch_size * 3)
        self._init_weights()

    def _init_weights(self) -> None:
        # as the official MAE: patch projection like a Linear (xavier on the flattened kernel),
        # tokens N(0, 0.02), xavier-uniform Linear layers, LayerNorm at identity
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def encode(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """-> (latent [B, 1 + len_keep, D], mask [B, L], ids_restore [B, L]); mask_ratio 0 keeps all.

        noise [B, L]: the official masking noise (keep the len_keep lowest); None draws a random
        permutation per sample from the global generator."""
        # a transposed view of the convolution's output: the masking kernel reads it in place
        x = self.patch_embed(imgs)
        cls = self.cls_token + self.pos_embed[:, :1]
        if mask_ratio > 0:
            # the masking gather adds the fixed position embedding to the kept rows and writes the
            # class token as row 0: the official x + pos_embed, gather and cat in one pass over 25% of x
            x, mask, ids_restore = ops.random_masking(
                x, mask_ratio, noise=noise, pos_embed=self.pos_embed[:, 1:], cls_token=cls,
                backend=self.backend,
            )
        else:
            x, mask, ids_restore = x + self.pos_embed[:, 1:], None, None
            x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [B, 1 + len_keep, D] -> pixel predictions [B, 1 + L, p*p*3] (row 0: the class token's)."""
        x = self.decoder_embed(latent)
        # one pass: the class token, the unshuffled tokens with mask tokens, + the fixed position embedding
        x = ops.unshuffle_tokens(x, self.mask_token, ids_restore, pos_embed=self.decoder_pos_embed,
                                 with_cls_token=True, backend=self.backend)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        """-> (loss, pred [B, L, p*p*3] (a view), mask [B, L])."""
        latent, mask, ids_restore = self.encode(imgs, mask_ratio, noise)
        pred = self.decode(latent, ids_restore)
        # the criterion skips the class-token row and reads the target from imgs in the patchify
        # layout, so neither pred[:, 1:] nor patchify(imgs) is ever copied
        loss = self.criterion(imgs, pred, mask)
        return loss, pred[:, 1:], mask


class MAEEncoder(nn.Module):
    """The MAE encoder without masking, for kNN / linear evaluation: imgs -> class token [B, D]."""

    def __init__(self, mae: MaskedAutoencoderViT):
        super().__init__()
        self.mae = mae

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.mae.encode(imgs, mask_ratio=0.0)[0][:, 0]


def mae_vit(
    size: str, image_size: int, patch_size: int = 16, depth: int | None = None, **options
) -> MaskedAutoencoderViT:
    """MAE with a ViT-{tiny,small,base} encoder; `options`: MaskedAutoencoderViT's other keywords
    (decoder_dim, decoder_depth, decoder_heads, norm_pix_loss, backend)."""
    if size not in VIT_SIZES or size in VIT_BLOCK_OPTIONS:  # MAE's blocks are the plain ViT's
        sizes = tuple(s for s in VIT_SIZES if s not in VIT_BLOCK_OPTIONS)
        raise ValueError(f"ViT size must be one of {sizes} for MAE, got {size!r}")
    if image_size % patch_size != 0:
        raise ValueError(f"image_size must be a multiple of patch_size={patch_size}, got {image_size}")
    dim, default_depth, heads = VIT_SIZES[size]
    return MaskedAutoencoderViT(image_size, patch_size, dim, depth or default_depth, heads, **options)
