"""Attention kernel benchmarks on LIVR layouts (``benchmarks/layouts.py``), bottleneck rule.

Methods, each timed for the forward (under no_grad) and for forward + backward:

* ``livr``: ``segment_attention`` with a prebuilt ``SegmentLayout`` (tile lists cached, as when one
  layout is shared by every layer); ``livr+layout`` builds the layout on every call.
* ``sdpa_dense_mask``: SDPA with the (B, 1, N, N) boolean mask from ``segment_mask`` (prebuilt) and
  K/V repeated to the query heads, as transformers does for masked SDPA.
* ``flex`` (CUDA): compiled FlexAttention with the same mask as a ``mask_mod`` over the segment ids,
  block mask prebuilt; ``flex+block_mask`` creates the block mask on every call.
* ``sdpa_causal`` (CUDA): SDPA ``is_causal=True`` (flash backend), no LIVR mask: the speed floor.

``extra_info`` holds the TFLOP/s of the work the mask actually requires (4 * D FLOPs per allowed
(query, key) pair and query head for the forward, 2.5x that with the backward; the same numerator
for every method, so it is a speed ratio), the peak memory of one call (CUDA allocator; not
measured on CPU, where the kernel runs in the Triton interpreter), and the memory of the mask
structure each method keeps between calls.

On CUDA: N = 2k..16k, bf16, D = 128, 16 query heads, 2 K/V heads, batch 16k tokens / N. On CPU
the sizes are small and the livr kernel runs in the interpreter: CPU timings measure nothing
about the kernel's speed, only that the suite works.

    python -m pytest benchmarks/test_attention.py --benchmark-only
"""
from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

from layouts import LAYOUT_NAMES, LIVR_SPEC, SMALL_SPEC, Layout, LayoutSpec, allowed_pairs, make_layout
from livr_kernels import Segment, SegmentLayout, resolve_rule, segment_attention, segment_mask
from livr_kernels.attention import kernel_tiles
from livr_kernels.config import default_config
from livr_kernels.segments import NUM_SEGMENTS

MIB = 2**20
RULE = "bottleneck"
FWD_FLOPS_PER_PAIR_PER_DIM = 4
BWD_FLOP_FACTOR = 2.5
MODES = ("fwd", "fwd_bwd")
SETUP_REPEATS = 5
METHODS = ("livr", "livr+layout", "sdpa_dense_mask", "flex", "flex+block_mask", "sdpa_causal")
CUDA_ONLY = {
    "flex": "FlexAttention is benchmarked on CUDA only (no CPU backward, no compiled CPU kernel)",
    "flex+block_mask": "FlexAttention is benchmarked on CUDA only (no CPU backward, no compiled CPU kernel)",
    "sdpa_causal": "the no-mask speed reference (flash SDPA) only means something on CUDA",
}
CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class BenchShape:
    dtype: torch.dtype
    head_dim: int
    q_heads: int
    kv_heads: int
    seq_lens: Tuple[int, ...]
    tokens_per_batch: int
    spec: LayoutSpec
    rounds: int
    warmup_rounds: int
    atol: float
    rtol: float

    def batch(self, n: int) -> int:
        return max(1, self.tokens_per_batch // n)


# The target setting.
CUDA_SHAPE = BenchShape(
    dtype=torch.bfloat16, head_dim=128, q_heads=16, kv_heads=2, seq_lens=(2048, 4096, 8192, 16384),
    tokens_per_batch=16384, spec=LIVR_SPEC, rounds=20, warmup_rounds=3, atol=2e-2, rtol=2e-2,
)
# Small enough for the interpreter: the whole CPU suite takes about a minute.
CPU_SHAPE = BenchShape(
    dtype=torch.float32, head_dim=32, q_heads=2, kv_heads=1, seq_lens=(384,),
    tokens_per_batch=2 * 384, spec=SMALL_SPEC, rounds=1, warmup_rounds=0, atol=1e-4, rtol=1e-4,
)
SHAPE = CUDA_SHAPE if CUDA else CPU_SHAPE
DEVICE = torch.device("cuda" if CUDA else "cpu")


@dataclass
class Case:
    """Inputs of one (layout, N): tensors on the device plus lazily built masks."""

    layout: Layout
    segment_ids: torch.Tensor
    doc_ids: Optional[torch.Tensor]
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    do: torch.Tensor
    seg_layout: SegmentLayout
    allowed_pairs: int
    causal_pairs: int
    _cache: dict = field(default_factory=dict)

    def cached(self, name: str, build: Callable):
        if name not in self._cache:
            self._cache[name] = build()
        return self._cache[name]

    @property
    def live_rows(self) -> torch.Tensor:
        """(B, N) bool: query rows with at least one allowed key (every non-PAD token sees itself)."""
        return self.segment_ids != int(Segment.PAD)


@functools.lru_cache(maxsize=1)
def make_case(layout_name: str, n: int) -> Case:
    torch.manual_seed(0)
    batch = SHAPE.batch(n)
    layout = make_layout(layout_name, n, batch, SHAPE.spec)
    seg = layout.segment_ids.to(DEVICE)
    doc = None if layout.doc_ids is None else layout.doc_ids.to(DEVICE)
    shape_q = (batch, SHAPE.q_heads, n, SHAPE.head_dim)
    shape_kv = (batch, SHAPE.kv_heads, n, SHAPE.head_dim)
    q, do = (torch.randn(shape_q, device=DEVICE, dtype=SHAPE.dtype) for _ in range(2))
    k, v = (torch.randn(shape_kv, device=DEVICE, dtype=SHAPE.dtype) for _ in range(2))
    allowed = allowed_pairs(seg, doc, RULE)
    return Case(layout, seg, doc, q, k, v, do, SegmentLayout(seg, doc), allowed, batch * n * (n + 1) // 2)


def dense_mask(case: Case) -> torch.Tensor:
    return case.cached("dense_mask", lambda: segment_mask(case.segment_ids, RULE, case.doc_ids)[:, None])


def run_livr(case: Case, q, k, v):
    return segment_attention(q, k, v, case.seg_layout, rule=RULE, backend="triton")


def run_livr_with_layout(case: Case, q, k, v):
    return segment_attention(q, k, v, case.segment_ids, rule=RULE, doc_ids=case.doc_ids, backend="triton")


def run_sdpa_dense(case: Case, q, k, v):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(case))


def run_sdpa_causal(case: Case, q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def flex_mask_mod(case: Case):
    """The bottleneck rule as a FlexAttention mask_mod: a 25-entry allow table indexed by the kinds."""
    table = resolve_rule(RULE).table(DEVICE).flatten()
    seg, doc = case.segment_ids, case.doc_ids

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = table[seg[b, q_idx] * NUM_SEGMENTS + seg[b, kv_idx]] & (kv_idx <= q_idx)
        if doc is not None:
            allowed = allowed & (doc[b, q_idx] == doc[b, kv_idx])
        return allowed

    return mask_mod


# Every (layout, N, mode) is a new shape or mask_mod for torch.compile: more recompiles than
# dynamo's default limit of 8, past which it silently falls back to (slow) eager code.
FLEX_RECOMPILE_LIMIT = 256


@functools.lru_cache(maxsize=1)
def _allow_flex_recompiles() -> None:
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, FLEX_RECOMPILE_LIMIT)


def build_block_mask(case: Case):
    from torch.nn.attention.flex_attention import create_block_mask

    _allow_flex_recompiles()
    batch, n = case.segment_ids.shape
    return create_block_mask(flex_mask_mod(case), batch, None, n, n, device=DEVICE, _compile=True)


@functools.lru_cache(maxsize=1)
def compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    _allow_flex_recompiles()
    return torch.compile(flex_attention, dynamic=False)


def run_flex(case: Case, q, k, v):
    block_mask = case.cached("block_mask", lambda: build_block_mask(case))
    return compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=True)


def run_flex_with_block_mask(case: Case, q, k, v):
    return compiled_flex()(q, k, v, block_mask=build_block_mask(case), enable_gqa=True)


RUNNERS = {
    "livr": run_livr,
    "livr+layout": run_livr_with_layout,
    "sdpa_dense_mask": run_sdpa_dense,
    "flex": run_flex,
    "flex+block_mask": run_flex_with_block_mask,
    "sdpa_causal": run_sdpa_causal,
}


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def make_step(case: Case, method: str, mode: str):
    """The timed callable: one forward (no autograd graph) or one forward + backward."""
    runner = RUNNERS[method]
    if mode == "fwd":
        def step():
            with torch.no_grad():
                out = runner(case, case.q, case.k, case.v)
            _sync()
            return out
        return step

    q, k, v = (t.detach().requires_grad_() for t in (case.q, case.k, case.v))

    def step():
        for t in (q, k, v):
            t.grad = None
        out = runner(case, q, k, v)
        out.backward(case.do)
        _sync()
        return out

    return step


def expected_output(case: Case, method: str) -> Optional[torch.Tensor]:
    """An independent result to check ``method`` against: the dense-mask SDPA, livr for SDPA itself, causal
    SDPA for the causal Triton kernel."""
    if method == "sdpa_causal":
        return None
    if method == "triton_causal":
        other = run_sdpa_causal
    else:
        other = run_livr if method == "sdpa_dense_mask" else run_sdpa_dense
    with torch.no_grad():
        return case.cached(f"expected_{other.__name__}", lambda: other(case, case.q, case.k, case.v))


def peak_memory_mib(step) -> Optional[float]:
    """Peak CUDA memory allocated by one call above what was live before it."""
    if not CUDA:
        return None
    _sync()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    _sync()
    return (torch.cuda.max_memory_allocated() - before) / MIB


def median_ms(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one warm-up call (which may compile)."""
    fn()
    _sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def build_livr_schedules(case: Case, mode: str):
    """A fresh SegmentLayout and the tile lists of every kernel ``mode`` launches, from one
    classification, exactly as ``segment_attention`` builds them."""
    layout = SegmentLayout(case.segment_ids, case.doc_ids)
    config = default_config(SHAPE.head_dim, torch.cuda.get_device_capability() if CUDA else None, SHAPE.dtype)
    tiles = kernel_tiles(config, backward=mode == "fwd_bwd")
    return list(layout.schedules(resolve_rule(RULE), tiles, case.segment_ids.shape[1]).values())


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def mask_memory_mib(case: Case, method: str, mode: str) -> float:
    """Memory of what each method keeps for the mask between calls (ids, tile lists, masks)."""
    ids = _nbytes(case.segment_ids, case.doc_ids)
    if method.startswith("livr"):
        schedules = build_livr_schedules(case, mode)
        return (ids + sum(_nbytes(*vars(s).values()) for s in schedules)) / MIB
    if method == "sdpa_dense_mask":
        return _nbytes(dense_mask(case)) / MIB
    if method.startswith("flex"):
        block_mask = case.cached("block_mask", lambda: build_block_mask(case))
        return (ids + _nbytes(*vars(block_mask).values())) / MIB
    return 0.0


CASES = [
    pytest.param(layout, n, mode, method, id=f"{mode}-{layout}-N{n}-{method}")
    for layout in LAYOUT_NAMES
    for n in SHAPE.seq_lens
    for mode in MODES
    for method in METHODS
]


@pytest.mark.parametrize("layout_name,n,mode,method", CASES)
def test_attention(benchmark, layout_name, n, mode, method):
    if not CUDA and method in CUDA_ONLY:
        pytest.skip(CUDA_ONLY[method])
    case = make_case(layout_name, n)
    step = make_step(case, method, mode)

    # First call: compiles (Triton, torch.compile) and checks the result on the rows that attend something.
    out = step().detach()
    expected = expected_output(case, method)
    if expected is not None:
        live = case.live_rows[:, None, :, None].expand_as(out)
        torch.testing.assert_close(out[live], expected[live], atol=SHAPE.atol, rtol=SHAPE.rtol)

    peak = peak_memory_mib(step)
    # The mask structures' own build time, the part "+layout" / "+block_mask" add per call.
    if method.startswith("livr"):
        setup_ms = median_ms(lambda: build_livr_schedules(case, mode), SETUP_REPEATS)
    elif method.startswith("flex"):
        setup_ms = median_ms(lambda: build_block_mask(case), SETUP_REPEATS)
    elif method == "sdpa_dense_mask":
        setup_ms = median_ms(lambda: segment_mask(case.segment_ids, RULE, case.doc_ids), SETUP_REPEATS)
    else:
        setup_ms = 0.0
    benchmark.group = f"{mode} {layout_name} N={n}"
    benchmark.pedantic(step, rounds=SHAPE.rounds, warmup_rounds=SHAPE.warmup_rounds, iterations=1)

    batch = case.segment_ids.shape[0]
    fwd_flops = FWD_FLOPS_PER_PAIR_PER_DIM * SHAPE.head_dim * case.allowed_pairs * SHAPE.q_heads
    flops = fwd_flops * (BWD_FLOP_FACTOR if mode == "fwd_bwd" else 1.0)
    benchmark.extra_info.update(
        method=method,
        mode=mode,
        layout=layout_name,
        device=torch.cuda.get_device_name() if CUDA else "cpu (Triton interpreter for livr)",
        dtype=str(SHAPE.dtype).replace("torch.", ""),
        batch=batch,
        seq_len=n,
        heads=f"{SHAPE.q_heads}q/{SHAPE.kv_heads}kv",
        head_dim=SHAPE.head_dim,
        allowed_fraction_of_causal=round(case.allowed_pairs / case.causal_pairs, 4),
        required_gflop=round(flops / 1e9, 3),
        peak_memory_mib=None if peak is None else round(peak, 1),
        mask_memory_mib=round(mask_memory_mib(case, method, mode), 3),
        mask_build_ms=round(setup_ms, 3),
    )
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        benchmark.extra_info["median_ms"] = round(median * 1e3, 3)
        benchmark.extra_info["required_tflops_per_s"] = float(f"{flops / median / 1e12:.4g}")
