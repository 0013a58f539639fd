"""The forward's TMA loads (``KernelConfig.fwd_tma``): K and V tiles read through (B, H, N, D)
tensor descriptors instead of pointers, under the Triton interpreter, against the float64
reference and the pointer loads."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import livr_kernels.forward as forward_mod
from kernel_cases import livr_layout, packed_docs, random_qkv
from livr_kernels import KernelConfig, segment_attention
from test_kernels import assert_close_fp32, kernel, reference64

# Small unequal tiles, as in test_kernels.py: many full, partial and empty tiles on short rows.
POINTER_TILES = KernelConfig(fwd_block_m=16, fwd_block_n=16, dkv_block_m=16, dkv_block_n=32, dq_block_m=32, dq_block_n=16)
TMA_TILES = dataclasses.replace(POINTER_TILES, fwd_tma=True)


@pytest.fixture
def descriptor_calls(monkeypatch):
    """Records whether each forward got descriptors (True) or fell back to pointers (False)."""
    calls = []
    original = forward_mod.tma_descriptors

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(forward_mod, "tma_descriptors", recording)
    return calls


# (batch, hq, hkv, n_q, n_k, head_dim, pad, num_docs): odd lengths (the last key tile runs past
# n_k, which the copy engine fills with zeros), GQA (the descriptor's head coordinate is the KV
# head), a head dim below its block (zero-filled columns), and fewer queries than keys.
CASES = [
    pytest.param(1, 2, 2, 37, 37, 16, 3, 0, id="n37"),
    pytest.param(2, 4, 2, 45, 45, 24, 5, 2, id="gqa-d24-docs"),
    pytest.param(1, 4, 1, 9, 50, 16, 0, 0, id="nq9-nk50-gqa4"),
]


@pytest.mark.parametrize("rule", ["bottleneck", "standard"])
@pytest.mark.parametrize("batch,hq,hkv,n_q,n_k,head_dim,pad,num_docs", CASES)
def test_tma_loads_equal_pointer_loads(descriptor_calls, rule, batch, hq, hkv, n_q, n_k, head_dim, pad, num_docs):
    seg = livr_layout(batch, n_k, pad=pad)
    doc = packed_docs(batch, n_k, num_docs) if num_docs else None
    q, k, v, do = random_qkv(batch, hq, hkv, n_q, n_k, head_dim)
    with_tma = kernel(q, k, v, do, seg, rule, doc, config=TMA_TILES)
    assert descriptor_calls == [True], "the forward did not take the descriptor path"
    with_pointers = kernel(q, k, v, do, seg, rule, doc, config=POINTER_TILES)
    assert_close_fp32(with_tma, reference64(q, k, v, do, seg, rule, doc))
    # Not bit for bit: the interpreter multiplies the transposed descriptor tile in another order.
    assert_close_fp32(with_tma, [t.double() for t in with_pointers])


def test_tma_is_off_unless_asked(descriptor_calls):
    seg = livr_layout(1, 20)
    q, k, v, do = random_qkv(1, 2, 1, 20, 20, 16)
    kernel(q, k, v, do, seg, "bottleneck", None, config=POINTER_TILES)
    assert descriptor_calls == []
    assert KernelConfig().fwd_tma is False


def test_unaligned_tensors_fall_back_to_pointer_loads(descriptor_calls):
    """The copy engine needs 16-byte aligned bases and row strides: a view that starts one element
    into its storage gets pointer loads, with the same result."""
    seg = livr_layout(1, 30, pad=2)
    q, k, v, do = random_qkv(1, 2, 1, 30, 30, 16)
    storage = torch.randn(1, 1, 30 * 16 + 1)
    shifted = storage[..., 1:].view(1, 1, 30, 16)
    k_shifted = shifted.copy_(k.detach()).requires_grad_()
    got = kernel(q, k_shifted, v, do, seg, "bottleneck", None, config=TMA_TILES)
    assert descriptor_calls == [False]
    assert_close_fp32(got, reference64(q, k, v, do, seg, "bottleneck", None))


def test_broadcast_heads_fall_back_to_pointer_loads(descriptor_calls):
    """K/V heads broadcast with expand() have stride 0, which a tensor map cannot take: pointer
    loads, same result as the materialised heads."""
    seg = livr_layout(1, 24, pad=2)
    q, k, v, do = random_qkv(1, 4, 1, 24, 24, 16)
    k_wide, v_wide = (t.detach().expand(1, 2, 24, 16).requires_grad_() for t in (k, v))
    assert k_wide.stride()[1] == 0
    got = kernel(q, k_wide, v_wide, do, seg, "bottleneck", None, config=TMA_TILES)
    assert descriptor_calls == [False]
    want = reference64(q, k_wide.detach().contiguous(), v_wide.detach().contiguous(), do, seg, "bottleneck", None)
    assert_close_fp32(got[:2], want[:2])


def test_row_strides_and_bases_must_be_16_byte_aligned():
    shifted = torch.zeros(1, 1, 30 * 16 + 1)[..., 1:].view(1, 1, 30, 16)
    assert forward_mod.tma_descriptors(shifted, shifted, 16, 16) is None
    k = torch.zeros(1, 2, 8, 12, dtype=torch.bfloat16)  # 24-byte rows
    assert forward_mod.tma_descriptors(k, k, 16, 16) is None
    k = torch.zeros(1, 2, 8, 16, dtype=torch.bfloat16)  # 32-byte rows
    descriptors = forward_mod.tma_descriptors(k, k, 16, 16)
    assert descriptors is not None and list(descriptors[0].block_shape) == [1, 1, 16, 16]


def test_segment_attention_takes_tma_from_the_config(descriptor_calls):
    seg = livr_layout(1, 20)
    q, k, v, _ = random_qkv(1, 2, 1, 20, 20, 16)
    out = segment_attention(q, k, v, seg, "bottleneck", backend="triton", config=TMA_TILES)
    assert descriptor_calls == [True] and torch.isfinite(out).all()


@pytest.mark.parametrize("batch,n_q,n_k", [(0, 5, 5), (1, 0, 0)], ids=["no-rows", "no-keys"])
def test_empty_keys_fall_back_to_pointer_loads(descriptor_calls, batch, n_q, n_k):
    """A tensor descriptor needs every dimension positive: empty K/V (no rows, or no keys) take the
    pointer path, which launches nothing, instead of failing on the descriptor's assertion."""
    q, k, v = (torch.randn(batch, 2, n, 16) for n in (n_q, n_k, n_k))
    seg = torch.zeros(batch, n_k, dtype=torch.long)
    out = segment_attention(q, k, v, seg, "standard", backend="triton", config=TMA_TILES)
    assert out.shape == q.shape and descriptor_calls == [False]
