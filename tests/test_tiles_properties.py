"""Property tests of the host path that decides which tiles the kernels visit: the classification
(``TileMask``), the tile lists (``coarse_schedules``, ``TileSchedule.batch_from_keys``), the launch
order and ``SegmentLayout.extend``, over random layouts against the dense reference mask; and the
kernels under the interpreter on a few random layouts."""
from __future__ import annotations

import math

import pytest
import torch
import triton
from hypothesis import example, given, settings, strategies as st
from kernel_cases import poison_outputs

from livr_kernels import RULES, KernelConfig, Segment, SegmentLayout, reference_attention, segment_attention, segment_mask
from livr_kernels.attention import kernel_tiles
from livr_kernels.config import _FP32_CONFIGS, _OLD_TRITON_OVERRIDES, GENERATIONS
from livr_kernels.tiles import TILE_EMPTY, TILE_FULL, TILE_PARTIAL, TileSchedule, coarse_classes, coarse_schedules

TILE_SIZES = (16, 32, 64, 128)
MAX_LEN = 300
MAX_RUN = 64
MAX_DOC_CUTS = 8
# Every tile shape list that ships in the config tables.
TABLE_TILES = sorted(
    {
        tuple(kernel_tiles(config).items())
        for table in (*GENERATIONS.values(), _FP32_CONFIGS, *_OLD_TRITON_OVERRIDES.values())
        for config in table.values()
    }
)
PAD = int(Segment.PAD)
FP32_RELATIVE_TOLERANCE = 1e-5
SCHEDULE_FIELDS = ("full_count", "full_index", "partial_count", "partial_index", "order")


@st.composite
def kind_rows(draw, n, min_run=1):
    """One row of segment kinds: random runs (with or without IMAGE), a LIVR prompt, or all PAD."""
    style = draw(st.sampled_from(["runs", "no_image", "livr", "all_pad"]))
    if style == "all_pad":
        return [PAD] * n
    if style == "livr":
        kinds = [Segment.TEXT, Segment.IMAGE, Segment.TEXT, Segment.LATENT, Segment.ANSWER, Segment.PAD]
        runs = [(k, draw(st.integers(min_run - 1, MAX_RUN))) for k in kinds]
        if draw(st.booleans()):
            runs = [runs[-1]] + runs[:-1]  # left padding
    else:
        kinds = [k for k in Segment if style == "runs" or k != Segment.IMAGE]
        runs = draw(st.lists(st.tuples(st.sampled_from(kinds), st.integers(min_run, MAX_RUN)), min_size=1, max_size=12))
    row = [int(k) for k, length in runs for _ in range(length)]
    last = row[-1] if row else int(Segment.TEXT)
    return (row + [last] * n)[:n]


@st.composite
def doc_rows(draw, n, labels):
    """Contiguous documents (length-1 ones included) labelled 0, 1, ... or, ``hashed``, by distinct
    arbitrary int64 ids in no particular order."""
    cuts = sorted(set(draw(st.lists(st.integers(1, n - 1), max_size=MAX_DOC_CUTS)))) if n > 1 else []
    starts = torch.tensor(cuts, dtype=torch.long)
    doc = torch.bucketize(torch.arange(n), starts, right=True)
    if labels == "hashed":
        wide = st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-(2**62), 2**62))
        ids = draw(st.lists(wide, min_size=len(cuts) + 1, max_size=len(cuts) + 1, unique=True))
        doc = torch.tensor(ids, dtype=torch.long)[doc]
    return doc


@st.composite
def layouts(draw, max_len=MAX_LEN, max_batch=3, min_run=1):
    """(segment ids (B, N), document ids (B, N) or None)."""
    batch = draw(st.integers(1, max_batch))
    n = draw(st.integers(1, max_len))
    seg = torch.tensor([draw(kind_rows(n, min_run)) for _ in range(batch)], dtype=torch.long)
    labels = draw(st.sampled_from([None, "increasing", "hashed"]))
    doc = None if labels is None else torch.stack([draw(doc_rows(n, labels)) for _ in range(batch)])
    return seg, doc


def num_queries(n, least=0):
    """All the keys' positions, or the last few (none at all unless ``least`` says otherwise)."""
    return st.one_of(st.just(n), st.integers(least, n))


tile_shapes = st.tuples(st.sampled_from(TILE_SIZES), st.sampled_from(TILE_SIZES), st.booleans())


@st.composite
def kernel_tile_sets(draw):
    """1-3 kernels' tile shapes: random (sometimes with a twin whose list has the same shape), or a
    config table's forward, dK/dV and dQ tiles."""
    if draw(st.booleans()):
        return dict(draw(st.sampled_from(TABLE_TILES)))
    shapes = draw(st.lists(tile_shapes, min_size=1, max_size=3))
    if draw(st.booleans()):
        bm, bn, by_key = shapes[0]
        shapes.append((bn, bm, not by_key))
    return {f"k{i}": shape for i, shape in enumerate(shapes)}


def dense_tiles(mask, bm, bn):
    """Per (B, R, C) tile of the dense (B, Nq, Nk) mask: any pair allowed; every in-bounds pair
    allowed; the tile wholly in bounds."""
    batch, n_q, n_k = mask.shape
    rows, cols = triton.cdiv(n_q, bm), triton.cdiv(n_k, bn)
    pad = (0, cols * bn - n_k, 0, rows * bm - n_q)
    inside = torch.nn.functional.pad(torch.ones(1, n_q, n_k, dtype=torch.bool), pad).view(1, rows, bm, cols, bn)
    tiles = torch.nn.functional.pad(mask, pad).view(batch, rows, bm, cols, bn)
    return tiles.any(4).any(2), (tiles | ~inside).all(4).all(2), inside.all(4).all(2)


def assert_sound(classes, seg, doc, rule, bm, bn, n_q):
    mask = segment_mask(seg, rule, doc, num_queries=n_q)
    live, all_allowed, whole = dense_tiles(mask, bm, bn)
    assert classes.shape == live.shape
    assert not (live & (classes == TILE_EMPTY)).any(), "a tile with an allowed pair is EMPTY"
    assert not ((classes == TILE_FULL) & ~(all_allowed & whole)).any(), "a FULL tile has a masked or out-of-bounds pair"
    assert ((classes == TILE_EMPTY) | (classes == TILE_PARTIAL) | (classes == TILE_FULL)).all()


def assert_schedule_lists(schedule, classes, by_key):
    """The lists hold each FULL and each PARTIAL tile of the classes once, ascending, counted right;
    the order is a longest-first permutation of the rows."""
    rows_classes = classes.transpose(1, 2) if by_key else classes
    batch, rows, cols = rows_classes.shape
    for count, index, kind in (
        (schedule.full_count, schedule.full_index, TILE_FULL),
        (schedule.partial_count, schedule.partial_index, TILE_PARTIAL),
    ):
        assert count.shape == (batch, rows) and index.shape == (batch, rows, cols)
        assert count.dtype == torch.int32 and index.dtype == torch.int32
        marked = rows_classes == kind
        assert torch.equal(count, marked.sum(-1, dtype=torch.int32))
        used = torch.arange(cols) < count[..., None]
        assert ((index >= 0) & (index < cols)).all()
        hits = torch.zeros(batch, rows, cols, dtype=torch.int32).scatter_add_(2, index.long(), used.to(torch.int32))
        assert torch.equal(hits, marked.to(torch.int32)), "a tile listed twice, missing, or of another class"
        assert ((index[..., 1:] > index[..., :-1]) | ~used[..., 1:]).all(), "a list is not ascending"
    order = schedule.order
    assert order.dtype == torch.int64 and order.shape == (batch * rows,)
    assert torch.equal(torch.sort(order).values, torch.arange(batch * rows)), "the launch order is not a permutation"
    tiles = schedule.tiles_per_row.flatten()[order]
    assert (tiles[:-1] >= tiles[1:]).all(), "the launch order is not longest first"
    ties = tiles[:-1] == tiles[1:]
    assert (order[:-1] < order[1:])[ties].all(), "rows with as many tiles left row order"


def assert_same_schedule(a: TileSchedule, b: TileSchedule, name):
    for field in SCHEDULE_FIELDS:
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and torch.equal(x, y), (name, field)
        assert x.is_contiguous(), (name, field)


@settings(max_examples=100, deadline=None)
@given(
    data=layouts(),
    rule=st.sampled_from(sorted(RULES)),
    bm=st.sampled_from(TILE_SIZES),
    bn=st.sampled_from(TILE_SIZES),
    n_q_data=st.data(),
)
def test_tile_mask_is_sound(data, rule, bm, bn, n_q_data):
    seg, doc = data
    n_q = n_q_data.draw(num_queries(seg.shape[1]))
    tiles = SegmentLayout(seg, doc).tile_mask(rule, bm, bn, num_queries=n_q)
    classes = tiles.to_dense()
    assert_sound(classes, seg, doc, rule, bm, bn, n_q)
    counts = tiles.counts()
    assert sum(counts.values()) == classes.numel()
    assert counts["full"] == int((classes == TILE_FULL).sum())
    causal = segment_mask(torch.zeros_like(seg), "standard", num_queries=n_q)
    assert tiles.causal_tiles() == int(dense_tiles(causal, bm, bn)[0].sum())


@settings(max_examples=100, deadline=None)
@given(data=layouts(), rule=st.sampled_from(sorted(RULES)), tiles=kernel_tile_sets(), n_q_data=st.data())
def test_schedules_list_exactly_the_sound_classes(data, rule, tiles, n_q_data):
    """Every kernel's lists, built together by ``SegmentLayout.schedules``: sound against the dense
    mask, and equal, field by field, to the lists of each kernel built alone from the same fine
    weights (no grouping) and to ``TileSchedule.from_classes`` of the coarse classes."""
    seg, doc = data
    n = seg.shape[1]
    n_q = n_q_data.draw(num_queries(n))
    layout = SegmentLayout(seg, doc)
    together = layout.schedules(rule, tiles, n_q)
    sizes = [size for bm, bn, _ in tiles.values() for size in (bm, bn)]
    g, span = math.gcd(*sizes), math.lcm(*sizes)
    weights = layout.fine_weights(RULES[rule], g, n_q, span)
    grouped = coarse_schedules(weights, g, tiles, n_q, n)
    for name, (bm, bn, by_key) in tiles.items():
        classes = coarse_classes(weights, g, bm, bn, n_q, n)
        assert_sound(classes, seg, doc, rule, bm, bn, n_q)
        assert_schedule_lists(together[name], classes, by_key)
        alone = coarse_schedules(weights, g, {name: (bm, bn, by_key)}, n_q, n)[name]
        assert_same_schedule(grouped[name], alone, name)
        assert_same_schedule(together[name], alone, name)
        assert_same_schedule(TileSchedule.from_classes(classes.transpose(1, 2) if by_key else classes), alone, name)


@settings(max_examples=60, deadline=None)
@given(
    keys=st.integers(1, 4).flatmap(
        lambda s: st.tuples(st.just(s), st.integers(1, 3), st.integers(0, 6), st.integers(0, 9))
    ),
    data=st.data(),
)
def test_batch_from_keys_equals_from_keys_one_at_a_time(keys, data):
    num, batch, rows, cols = keys
    classes = torch.tensor(
        data.draw(st.lists(st.sampled_from([TILE_EMPTY, TILE_PARTIAL, TILE_FULL]), min_size=num * batch * rows * cols,
                           max_size=num * batch * rows * cols))
    ).view(num, batch, rows, cols)
    full, partial = classes == TILE_FULL, classes == TILE_PARTIAL
    stacked = torch.stack([full, partial, full | partial]).to(torch.int8)
    for i, schedule in enumerate(TileSchedule.batch_from_keys(stacked)):
        alone = TileSchedule.from_keys(stacked[:, i])
        assert_same_schedule(schedule, alone, i)
        assert_schedule_lists(schedule, classes[i], by_key=False)


@st.composite
def decode_runs(draw):
    """A layout, a prompt length, decode steps of 1..g tokens (some of up to 2g), each with its new
    document ids given or left to continue the last token's and with or without its schedules
    asked for (for its own tokens and for a random number of queries), and whether the prompt's
    document ids come as int32 (where they fit)."""
    seg, doc = draw(layouts(max_len=160, max_batch=2))
    n = seg.shape[1]
    prompt = draw(st.integers(1, n - 1)) if n > 1 else n
    tiles = draw(kernel_tile_sets())
    g = math.gcd(*(size for bm, bn, _ in tiles.values() for size in (bm, bn)))
    steps, used = [], prompt
    while used < n and len(steps) < 12:
        m = min(n - used, draw(st.integers(1, g)) if draw(st.booleans()) else draw(st.integers(1, 2 * g)))
        steps.append((m, draw(st.booleans()), draw(st.booleans()), draw(st.integers(1, used + m))))
        used += m
    return seg[:, :used], doc if doc is None else doc[:, :used], prompt, tiles, steps, draw(st.booleans())


ONE_TILE = {"k0": (16, 16, False)}
# The two defects this test found, shrunk: a new document id sorting before the cached ones (the
# carried summaries kept the old labels: the query's own cached block was EMPTY), and an int64 id
# after int32 ones (cast to int32: 2**32 became document 0).
RELABELLED = (torch.zeros(1, 34, dtype=torch.long), torch.tensor([[10] * 16 + [20] * 16 + [5, 20]]), 32, ONE_TILE,
              [(1, True, True, 1), (1, True, True, 1)], False)
WIDER = (torch.zeros(1, 5, dtype=torch.long), torch.tensor([[0, 0, 1, 1, 2**32]]), 4, ONE_TILE, [(1, True, True, 1)], True)


@settings(max_examples=100, deadline=None)
@example(run=RELABELLED, rule="standard")
@example(run=WIDER, rule="standard")
@given(run=decode_runs(), rule=st.sampled_from(sorted(RULES)))
def test_extension_equals_the_layout_built_whole(run, rule):
    """Decode steps (``extend`` by 1..g tokens, after a prefill that filled the caches) give the
    summaries and tile lists of the layout built whole, and sound classes."""
    seg, doc, prompt, tiles, steps, narrow = run
    doc = None if doc is None else doc.clone()
    prompt_doc = None if doc is None else doc[:, :prompt]
    if narrow and doc is not None and prompt_doc.abs().max() < 2**31:
        prompt_doc = prompt_doc.to(torch.int32)
    layout = SegmentLayout(seg[:, :prompt], prompt_doc)
    layout.schedules(rule, tiles, prompt)
    end = prompt
    for m, explicit_docs, look, some_queries in steps:
        new_docs = None
        if doc is not None:
            if explicit_docs:
                new_docs = doc[:, end:end + m]
            else:
                doc[:, end:end + m] = doc[:, end - 1:end]  # the new tokens continue the last document
        layout = layout.extend(seg[:, end:end + m], new_docs)
        end += m
        if not look and end < seg.shape[1]:
            continue  # no schedules this step: the next one extends a layout with nothing cached
        whole = SegmentLayout(seg[:, :end], None if doc is None else doc[:, :end])
        assert torch.equal(layout.segment_ids, whole.segment_ids)
        assert (layout.doc_ids is None) == (whole.doc_ids is None)
        if doc is not None:
            assert torch.equal(layout.doc_ids, whole.doc_ids)
        for n_q in {m, some_queries}:
            got, want = layout.schedules(rule, tiles, n_q), whole.schedules(rule, tiles, n_q)
            for name, (bm, bn, _) in tiles.items():
                assert_same_schedule(got[name], want[name], name)
                classes = layout.tile_mask(rule, bm, bn, num_queries=n_q).to_dense()
                assert_sound(classes, whole.segment_ids, whole.doc_ids, rule, bm, bn, n_q)
        for block_size in {math.gcd(bm, bn) for bm, bn, _ in tiles.values()}:
            a, b = layout.summary(block_size), whole.summary(block_size)
            for field in ("kinds", "doc_min", "doc_max"):
                x, y = getattr(a, field), getattr(b, field)
                assert (x is None and y is None) or torch.equal(x, y), (block_size, field)


def _grads(fn, q, k, v, do):
    out = fn(q, k, v)
    return (out,) + torch.autograd.grad(out, (q, k, v), do)


BLOCK_FIELDS = ("fwd_block_m", "fwd_block_n", "dkv_block_m", "dkv_block_n", "dq_block_m", "dq_block_n")
KERNEL_MAX_LEN = 64
# Runs of at least this many tokens of one kind, so full tiles occur in short sequences too.
KERNEL_MIN_RUN = 8


@st.composite
def kernel_cases(draw):
    """(segment ids, document ids or None, queries, tile config, (Hq, Hkv), seed) for the interpreter."""
    seg, doc = draw(layouts(max_len=KERNEL_MAX_LEN, max_batch=2, min_run=KERNEL_MIN_RUN))
    n_q = draw(num_queries(seg.shape[1], least=1))
    config = KernelConfig(**{field: draw(st.sampled_from((16, 32))) for field in BLOCK_FIELDS})
    return seg, doc, n_q, config, draw(st.sampled_from([(2, 1), (2, 2), (4, 2)])), draw(st.integers(0, 2**16))


def _livr_rows(*rows):
    return torch.tensor([[int(kind) for kind, length in row for _ in range(length)] for row in rows])


T, I, L, A, P = Segment.TEXT, Segment.IMAGE, Segment.LATENT, Segment.ANSWER, Segment.PAD
# Layouts where every kernel's lists hold full tiles (and partial and empty ones), whatever the draws give.
FULL_TILE_CASES = [
    (_livr_rows([(T, 20), (I, 20), (T, 4), (L, 8), (A, 12)], [(T, 16), (I, 24), (L, 8), (A, 8), (P, 8)]), None, 64,
     KernelConfig(**{field: 16 for field in BLOCK_FIELDS}), (2, 1), 0),
    (_livr_rows([(T, 48), (L, 8), (A, 24)]), torch.tensor([[0] * 8 + [1] * 72]), 64,
     KernelConfig(fwd_block_m=16, fwd_block_n=16, dkv_block_m=16, dkv_block_n=32, dq_block_m=32, dq_block_n=16), (4, 2), 1),
]


@pytest.mark.interpreter
@settings(max_examples=10, deadline=None)
@example(case=FULL_TILE_CASES[0], rule="bottleneck")
@example(case=FULL_TILE_CASES[1], rule="standard")
@given(case=kernel_cases(), rule=st.sampled_from(sorted(RULES)))
def test_kernels_match_the_float64_reference(case, rule):
    """Forward and gradients of the kernels under the interpreter, outputs NaN-poisoned so an
    unwritten element shows, against the float64 dense reference."""
    seg, doc, n_q, config, (hq, hkv), seed = case
    batch, n, head_dim = seg.shape[0], seg.shape[1], 16
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, n_q, head_dim, generator=gen).requires_grad_()
    k, v = (torch.randn(batch, hkv, n, head_dim, generator=gen).requires_grad_() for _ in range(2))
    do = torch.randn(batch, hq, n_q, head_dim, generator=gen)
    with pytest.MonkeyPatch.context() as patch:
        poison_outputs(patch)
        got = _grads(
            lambda a, b, c: segment_attention(a, b, c, seg, rule, doc, backend="triton", config=config), q, k, v, do
        )
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = _grads(lambda a, b, c: reference_attention(a, b, c, seg, rule, doc), q64, k64, v64, do.double())
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert not torch.isnan(g).any(), f"{name} has NaN (an unwritten element)"
        err = (g.double() - w).abs().max().item()
        assert err <= FP32_RELATIVE_TOLERANCE * max(w.abs().max().item(), 1.0), f"{name}: max error {err:.3g}"


def test_the_fixed_kernel_cases_have_full_tiles_in_every_kernel():
    """The explicit examples above keep the kernels' full-tile loops under test."""
    for (seg, doc, n_q, config, _, _), rule in zip(FULL_TILE_CASES, ("bottleneck", "standard")):
        schedules = SegmentLayout(seg, doc).schedules(rule, kernel_tiles(config), n_q)
        for name, schedule in schedules.items():
            assert (schedule.full_count > 0).any() and (schedule.partial_count > 0).any(), name
