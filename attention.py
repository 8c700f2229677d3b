"""Full (non-causal) attention for the video DiT.

`flash_attention(q, k, v, scale=None)` is the one entry point the models call,
with q, k, v of shape (B, H, N, D). The custom Triton kernel (FlashAttention-2,
forward and backward) lands here with its own issue; until then every device
uses PyTorch's scaled_dot_product_attention, behind this same interface, so
model code never changes when the kernel arrives.
"""

import torch.nn.functional as F


def flash_attention(q, k, v, scale=None):
    """softmax(q k^T * scale) v over the last two dims; scale defaults to D**-0.5."""
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k, v must share a (B, H, N, D) shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    return F.scaled_dot_product_attention(q, k, v, scale=scale)
