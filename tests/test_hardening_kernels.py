"""Issue 12's kernel and patch items: inputs that gave a wrong result or an unclear error."""
from __future__ import annotations

import dataclasses
import numpy as np
import pytest
import torch
from transformers import StaticCache

from kernel_cases import livr_layout, random_qkv
from livr_kernels import AttentionRule, KernelConfig, reference_attention, segment_attention, segment_mask
from livr_model import patch_attention
from tiny_models import TINY_TOKENS, BatchSpec, SampleLayout, build_tiny_model, make_batch, prompt_only

BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.interpreter)]
SMALL_TILES = KernelConfig(fwd_block_m=16, fwd_block_n=16, dkv_block_m=16, dkv_block_n=16, dq_block_m=16, dq_block_n=16)
# fp16 scores of q = k = 40 at D = 64: 40 * 40 * 64 = 102400 > 65504, the largest fp16.
OVERFLOW_VALUE = 40.0
OVERFLOW_HEAD_DIM = 64


@pytest.mark.parametrize("backend", BACKENDS)
def test_doc_ids_beyond_int32_keep_documents_apart(backend):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    seg = torch.zeros(1, 8, dtype=torch.long)
    docs = torch.tensor([[0] * 4 + [2**32] * 4])
    config = SMALL_TILES if backend == "triton" else None
    without = segment_attention(q, k, v, seg, "standard", backend=backend, config=config)
    with_docs = segment_attention(q, k, v, seg, "standard", doc_ids=docs, backend=backend, config=config)
    assert not torch.allclose(with_docs[..., 4:, :], without[..., 4:, :])
    # The second document sees only itself: like attention over its tokens alone.
    alone = segment_attention(q[..., 4:, :], k[..., 4:, :], v[..., 4:, :], seg[:, 4:], "standard", backend="reference")
    torch.testing.assert_close(with_docs[..., 4:, :], alone)


@pytest.mark.parametrize("backend", BACKENDS)
def test_interleaved_wide_doc_ids_match_the_int64_reference(backend):
    # Equal ids apart from each other stay one document after relabelling; -2**40 and 2**40 differ.
    q, k, v, _ = random_qkv(1, 2, 1, 12, 12, 16, requires_grad=False)
    seg = livr_layout(1, 12)
    docs = torch.tensor([[2**40, 2**40, -(2**40), -(2**40), 2**40, 2**40, 7, 7, -(2**40), 2**40, 7, 7]])
    want = reference_attention(q.double(), k.double(), v.double(), seg, "standard", docs)
    config = SMALL_TILES if backend == "triton" else None
    got = segment_attention(q, k, v, seg, "standard", doc_ids=docs, backend=backend, config=config)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_fp16_reference_scores_do_not_overflow():
    shape = (1, 2, 16, OVERFLOW_HEAD_DIM)
    q = torch.full(shape, OVERFLOW_VALUE, dtype=torch.float16)
    k = torch.full(shape, OVERFLOW_VALUE, dtype=torch.float16)
    v = torch.randn(shape).half()
    seg = torch.zeros(1, 16, dtype=torch.long)
    got = reference_attention(q, k, v, seg, "standard")
    assert not torch.isnan(got).any()
    want = reference_attention(q.double(), k.double(), v.double(), seg, "standard")
    # 2x the error of the exact result rounded to fp16, plus the flash-attention floor.
    bound = 2 * (want.half().double() - want).abs().max().item() + 1e-3
    assert (got.double() - want).abs().max().item() <= bound


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_reference_is_within_twice_its_rounding(dtype):
    q, k, v, _ = random_qkv(2, 4, 2, 33, 33, 32, dtype=dtype, requires_grad=False)
    q, k = q * 8, k * 8  # large scores: the fp16 matmul used to round them coarsely
    seg = livr_layout(2, 33, pad=3)
    want = reference_attention(q.double(), k.double(), v.double(), seg, "bottleneck")
    got = reference_attention(q, k, v, seg, "bottleneck")
    bound = 2 * (want.to(dtype).double() - want).abs().max().item() + 1e-3
    assert (got.double() - want).abs().max().item() <= bound


@pytest.mark.parametrize("entry", ["False", "True", 2, -1, 0.0, 1.5, None, torch.tensor(0.5)])
def test_rule_entries_must_be_bools(entry):
    table = [[True] * 5 for _ in range(5)]
    table[1][3] = entry
    with pytest.raises(ValueError, match=r"allowed\[1\]\[3\] \(IMAGE query, ANSWER key\)"):
        AttentionRule("x", table)


def test_string_table_is_refused_not_all_true():
    with pytest.raises(ValueError, match="must be a bool"):
        AttentionRule("x", [["False"] * 5] * 5)


def test_rule_entries_accept_bools_and_zero_one():
    table = [[np.bool_(True), 1, 0, torch.tensor(True), False]] + [[np.int64(0)] * 5] * 4
    rule = AttentionRule("x", table)
    assert rule.allowed[0] == (True, True, False, True, False)
    assert not any(any(row) for row in rule.allowed[1:])


@pytest.mark.interpreter
@pytest.mark.parametrize("index_ahead", [False, True])
def test_no_queries_give_zero_key_gradients(index_ahead):
    """No queries but keys: the dK/dV grid still has a program per key block, whose rows hold no
    tile index at all. Reading the first index ahead of the loop there read an empty tensor (a
    segfault under the interpreter, an illegal address on a GPU)."""
    config = dataclasses.replace(SMALL_TILES, dkv_index_ahead=index_ahead)
    q = torch.randn(1, 2, 0, 16, requires_grad=True)
    k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(2))
    out = segment_attention(q, k, v, torch.zeros(1, 40, dtype=torch.long), "standard", backend="triton", config=config)
    out.sum().backward()
    assert out.shape == q.shape and q.grad.shape == q.shape
    assert torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(v.grad, torch.zeros_like(v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_head_dim_is_a_value_error(backend):
    q = torch.randn(1, 2, 4, 0)
    with pytest.raises(ValueError, match="head dim of at least 1"):
        segment_attention(q, q, q, torch.zeros(1, 4, dtype=torch.long), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"), "0.5", True, [0.5]])
def test_bad_scale_is_refused_on_both_backends(backend, scale):
    q, k, v, _ = random_qkv(1, 2, 1, 4, 4, 16, requires_grad=False)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        segment_attention(q, k, v, torch.zeros(1, 4, dtype=torch.long), scale=scale, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_config_is_refused_on_both_backends(backend):
    q, k, v, _ = random_qkv(1, 2, 1, 4, 4, 16, requires_grad=False)
    with pytest.raises(ValueError, match="config must be None or a livr_kernels.KernelConfig"):
        segment_attention(q, k, v, torch.zeros(1, 4, dtype=torch.long), config={"fwd_block_m": 16}, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_given_scale_is_the_one_used(backend):
    """scale= multiplies the scores (models pass their own, e.g. a query_pre_attn_scalar), on both backends."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, _ = (t.to(device) for t in random_qkv(1, 2, 1, 12, 12, 16, requires_grad=False))
    seg = livr_layout(1, 12).to(device)
    scale = 0.7
    mask = segment_mask(seg, "bottleneck")[:, None]
    scores = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * scale
    want = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v.double().repeat_interleave(2, 1)
    config = SMALL_TILES if backend == "triton" else None
    got = segment_attention(q, k, v, seg, "bottleneck", scale=scale, backend=backend, config=config)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    default = segment_attention(q, k, v, seg, "bottleneck", backend=backend, config=config)
    assert not torch.allclose(got, default), "0.7 differs from 16 ** -0.5: the outputs must too"


def test_integer_scale_works_like_a_float():
    q, k, v, _ = random_qkv(1, 2, 1, 4, 4, 16, requires_grad=False)
    seg = torch.zeros(1, 4, dtype=torch.long)
    torch.testing.assert_close(segment_attention(q, k, v, seg, scale=1), segment_attention(q, k, v, seg, scale=1.0))


def _patched():
    model = build_tiny_model("qwen2_5_vl")
    return model, patch_attention(model, "bottleneck", latent_token_ids=TINY_TOKENS.latents)


@pytest.mark.parametrize(
    "use",
    [
        lambda h: h.set_rule("standard"),
        lambda h: h.capture_attention().__enter__(),
        lambda h: h.use_segment_ids(torch.zeros(1, 4, dtype=torch.long)).__enter__(),
    ],
    ids=["set_rule", "capture_attention", "use_segment_ids"],
)
def test_removed_handle_refuses_to_pretend(use):
    _, handle = _patched()
    handle.remove()
    with pytest.raises(RuntimeError, match="removed"):
        use(handle)


def test_static_cache_in_generate_is_named():
    model, _ = _patched()
    prompt = prompt_only(make_batch("qwen2_5_vl", BatchSpec(layouts=[SampleLayout(num_images=1)])), 2)
    with pytest.raises(ValueError, match="static caches are not supported"):
        with torch.no_grad():
            model.generate(**prompt, max_new_tokens=2, do_sample=False, cache_implementation="static")


def test_static_cache_object_is_named():
    model, _ = _patched()
    batch = make_batch("qwen2_5_vl", BatchSpec(layouts=[SampleLayout(num_images=1)]))
    cache = StaticCache(config=model.config.get_text_config(), max_cache_len=64)
    with pytest.raises(ValueError, match="static caches are not supported"):
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k != "labels"}, past_key_values=cache, use_cache=True)
