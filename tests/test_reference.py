"""The dense reference against a plain loop over (query, key) pairs and against SDPA."""
import torch

from kernel_cases import livr_layout, packed_docs
from livr_kernels import RULES, Segment, reference_attention, segment_mask
from livr_kernels.reference import reference_probs


def loop_mask(seg, rule, doc, n_q):
    batch, n_k = seg.shape
    offset = n_k - n_q
    mask = torch.zeros(batch, n_q, n_k, dtype=torch.bool)
    for b in range(batch):
        for i in range(n_q):
            qi = offset + i
            for j in range(n_k):
                ok = j <= qi and seg[b, qi] != Segment.PAD and seg[b, j] != Segment.PAD
                ok = ok and rule.allows(int(seg[b, qi]), int(seg[b, j]))
                if doc is not None:
                    ok = ok and bool(doc[b, qi] == doc[b, j])
                mask[b, i, j] = ok
    return mask


def test_segment_mask_matches_definition():
    seg = livr_layout(2, 23, pad=4)
    doc = packed_docs(2, 23, 2)
    for rule in RULES.values():
        for d in (None, doc):
            for n_q in (23, 5):
                assert torch.equal(segment_mask(seg, rule, d, num_queries=n_q), loop_mask(seg, rule, d, n_q))


def test_reference_matches_sdpa_where_rows_have_keys():
    seg = livr_layout(2, 31)
    q, k, v = torch.randn(2, 4, 31, 8), torch.randn(2, 2, 31, 8), torch.randn(2, 2, 31, 8)
    mask = segment_mask(seg, "bottleneck")[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask
    )
    torch.testing.assert_close(reference_attention(q, k, v, seg, "bottleneck"), want)


def test_empty_rows_are_zero_without_nan_gradient():
    seg = livr_layout(1, 12, pad=4)
    q, k, v = (torch.randn(1, 2, 12, 8, requires_grad=True) for _ in range(3))
    out = reference_attention(q, k, v, seg, "standard")
    out.sum().backward()
    assert torch.equal(out[0, :, -4:], torch.zeros(2, 4, 8))
    assert not torch.isnan(q.grad).any() and torch.equal(q.grad[0, :, -4:], torch.zeros(2, 4, 8))


def test_reference_probs_are_the_masked_softmax():
    """The probabilities the probes read: zero off the mask, rows summing to 1 (0 for PAD rows), and
    the same attention as reference_attention when applied to V."""
    seg = livr_layout(2, 19, pad=3)
    q, k, v = torch.randn(2, 4, 19, 8, dtype=torch.float64), torch.randn(2, 2, 19, 8, dtype=torch.float64), \
        torch.randn(2, 2, 19, 8, dtype=torch.float64)
    probs = reference_probs(q, k, seg, "bottleneck")
    mask = segment_mask(seg, "bottleneck")[:, None].expand_as(probs)
    assert torch.equal(probs[~mask], torch.zeros_like(probs[~mask]))
    has_key = mask.any(dim=-1)
    torch.testing.assert_close(probs.sum(-1), has_key.to(probs.dtype))
    scores = torch.matmul(q, k.repeat_interleave(2, 1).transpose(-1, -2)) * 8 ** -0.5
    want = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    torch.testing.assert_close(probs[has_key], want[has_key])
    torch.testing.assert_close(torch.matmul(probs, v.repeat_interleave(2, 1)), reference_attention(q, k, v, seg, "bottleneck"))
