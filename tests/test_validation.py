"""Every bad input to segment_attention raises a ValueError that names the problem."""
from __future__ import annotations

import pytest
import torch

from livr_kernels import SegmentLayout, segment_attention


def inputs(batch=1, hq=4, hkv=2, n=8, d=16, dtype=torch.float32):
    q = torch.randn(batch, hq, n, d, dtype=dtype)
    k = torch.randn(batch, hkv, n, d, dtype=dtype)
    v = torch.randn(batch, hkv, n, d, dtype=dtype)
    seg = torch.zeros(batch, n, dtype=torch.long)
    return q, k, v, seg


def call(q, k, v, seg, **kwargs):
    return segment_attention(q, k, v, seg, **kwargs)


CASES = {
    "q not 4-D": (lambda q, k, v, s: (q[0], k, v, s), {}, "q must be a 4-D tensor"),
    "k/v shapes differ": (lambda q, k, v, s: (q, k, v[:, :1], s), {}, "k and v must have the same shape"),
    "batch mismatch": (lambda q, k, v, s: (q, torch.cat([k, k]), torch.cat([v, v]), s), {}, "k/v must be"),
    "head dim mismatch": (lambda q, k, v, s: (q, k[..., :8], v[..., :8], s), {}, "k/v must be"),
    "heads not a multiple": (lambda q, k, v, s: (q[:, :3], k, v, s), {}, "multiple of k/v heads"),
    "more queries than keys": (lambda q, k, v, s: (torch.cat([q, q], 2), k, v, s), {}, "Nq=16 > Nk=8"),
    "dtype mismatch": (lambda q, k, v, s: (q.half(), k, v, s), {}, "share one dtype"),
    "integer q": (lambda q, k, v, s: (q.long(), k.long(), v.long(), s), {}, "dtype must be one of"),
    "segment ids wrong shape": (lambda q, k, v, s: (q, k, v, s[:, :5]), {}, r"segment_ids must be \(batch, Nk\)"),
    "segment ids 1-D": (lambda q, k, v, s: (q, k, v, s[0]), {}, "segment_ids must be a \\(batch, seq_len\\)"),
    "segment ids float": (lambda q, k, v, s: (q, k, v, s.float()), {}, "integer dtype"),
    "segment id out of range": (lambda q, k, v, s: (q, k, v, s + 5), {}, "values must lie in 0..4"),
    "negative segment id": (lambda q, k, v, s: (q, k, v, s - 1), {}, "values must lie in 0..4"),
    "doc ids wrong shape": (lambda q, k, v, s: (q, k, v, s), {"doc_ids": torch.zeros(1, 3, dtype=torch.long)}, "doc_ids must have the shape"),
    "doc ids float": (lambda q, k, v, s: (q, k, v, s), {"doc_ids": torch.zeros(1, 8)}, "doc_ids must have an integer dtype"),
    "unknown rule": (lambda q, k, v, s: (q, k, v, s), {"rule": "nope"}, "rule must be one of"),
    "unknown backend": (lambda q, k, v, s: (q, k, v, s), {"backend": "cuda"}, "backend must be one of"),
    "head dim over 256": (
        lambda q, k, v, s: (torch.randn(1, 4, 8, 272), torch.randn(1, 2, 8, 272), torch.randn(1, 2, 8, 272), s),
        {"backend": "triton"},
        "head dims up to 256",
    ),
    "float64 on the kernels": (lambda q, k, v, s: (q.double(), k.double(), v.double(), s), {"backend": "triton"}, "backend='triton' supports"),
    "layout plus doc ids": (
        lambda q, k, v, s: (q, k, v, SegmentLayout(s)),
        {"doc_ids": torch.zeros(1, 8, dtype=torch.long)},
        "doc_ids must be None when segment_ids is a SegmentLayout",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_raises(name):
    transform, kwargs, message = CASES[name]
    args = transform(*inputs())
    with pytest.raises(ValueError, match=message):
        call(*args, **kwargs)


def test_device_mismatch_raises():
    # No second device here: the meta device stands in for "another device".
    q, k, v, seg = inputs()
    with pytest.raises(ValueError, match="one device"):
        segment_attention(q, k.to("meta"), v.to("meta"), seg)


def test_valid_input_passes():
    q, k, v, seg = inputs()
    assert segment_attention(q, k, v, seg).shape == q.shape
