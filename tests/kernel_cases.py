"""Shared builders for kernel tests: LIVR-like segment layouts and random inputs."""
from __future__ import annotations

import torch

from livr_kernels import Segment


def livr_layout(batch: int, n: int, *, pad: int = 0, left_pad: bool = False, seed: int = 0) -> torch.Tensor:
    """Segment ids shaped like a LIVR prompt: text, an image, text, latents, answer, then padding.

    Lengths scale with ``n`` so even tiny sequences get every kind; ``pad`` tokens of padding go
    on the right (or left), varying per batch row.
    """
    gen = torch.Generator().manual_seed(seed)
    seg = torch.full((batch, n), int(Segment.TEXT), dtype=torch.long)
    for b in range(batch):
        n_pad = min(n - 1, max(0, pad - b))
        live = n - n_pad
        img_start = max(1, live // 10)
        img_end = img_start + max(1, live // 2)
        lat_start = min(live - 1, img_end + max(1, live // 20))
        lat_end = min(live, lat_start + max(1, live // 10))
        ans_start = min(live, lat_end + int(torch.randint(0, 3, (1,), generator=gen)))
        row = seg[b, n_pad:] if left_pad else seg[b, :live]
        row[img_start:img_end] = int(Segment.IMAGE)
        row[lat_start:lat_end] = int(Segment.LATENT)
        row[ans_start:] = int(Segment.ANSWER)
        if n_pad:
            if left_pad:
                seg[b, :n_pad] = int(Segment.PAD)
            else:
                seg[b, live:] = int(Segment.PAD)
    return seg


def packed_docs(batch: int, n: int, num_docs: int) -> torch.Tensor:
    """Document ids 0..num_docs-1 in contiguous runs of near-equal length."""
    bounds = torch.linspace(0, n, num_docs + 1).long()
    doc = torch.zeros(batch, n, dtype=torch.long)
    for i in range(num_docs):
        doc[:, bounds[i]:bounds[i + 1]] = i
    return doc


def poison_outputs(patch) -> None:
    """Every buffer the kernels' host code allocates (``_alloc`` of the forward and the backward)
    starts as NaN, so an element that no kernel writes shows up. ``patch``: a pytest MonkeyPatch."""
    import livr_kernels.backward as backward_mod
    import livr_kernels.forward as forward_mod

    def nan_alloc(*args, **kwargs):
        return torch.full(*args, float("nan"), **kwargs)

    patch.setattr(forward_mod, "_alloc", nan_alloc)
    patch.setattr(backward_mod, "_alloc", nan_alloc)


def random_qkv(batch, hq, hkv, n_q, n_k, head_dim, dtype=torch.float32, requires_grad=True):
    q = torch.randn(batch, hq, n_q, head_dim, dtype=dtype)
    k = torch.randn(batch, hkv, n_k, head_dim, dtype=dtype)
    v = torch.randn(batch, hkv, n_k, head_dim, dtype=dtype)
    do = torch.randn(batch, hq, n_q, head_dim, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)] + [do]
