"""GradCache's loss step: a contrastive loss over the full batch from features cached per micro-batch.

GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup") keeps the in-batch negatives of a large batch while holding only one micro-batch's
activations: (1) encode each micro-batch without a graph and cache its features; (2) compute the
loss on the concatenated cached features and the gradient of each feature row (this function);
(3) re-encode each micro-batch with a graph and backpropagate its slice of those gradients
(`features.backward(grad)`). Step 3 then accumulates exactly the full batch's parameter gradients
(the encoders must be deterministic between steps 1 and 3: same dropout draws, BatchNorm in eval
or with its statistics taken from step 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastssl.validation import check_tensor


def cached_loss_and_feature_grads(
    criterion: Callable[..., torch.Tensor], *features: torch.Tensor, **kwargs
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """criterion(*features, **kwargs) on cached features (e.g. the concatenated micro-batches of
    each tower), backpropagated once: returns (the detached loss, d loss / d features[i] for each i).
    Parameters the criterion uses directly (a learned logit scale or bias passed in kwargs, a module's
    own parameters) receive their gradient here, as in the full batch's backward."""
    leaves = [check_tensor(f"features[{i}]", f).detach().requires_grad_() for i, f in enumerate(features)]
    loss = criterion(*leaves, **kwargs)
    loss.backward()
    return loss.detach(), tuple(leaf.grad for leaf in leaves)
