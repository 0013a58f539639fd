"""Tile classification from block summaries against the dense mask."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from kernel_cases import livr_layout, packed_docs
from livr_kernels import RULES, Segment, SegmentLayout, segment_mask
from livr_kernels.blocks import PAST_END, TILE_EMPTY, TILE_FULL, TILE_PARTIAL, summarize_blocks


def check_tiles(seg, doc, rule, bm, bn, n_q):
    layout = SegmentLayout(seg, doc)
    classes = layout.tile_mask(rule, bm, bn, num_queries=n_q).to_dense()
    mask = segment_mask(seg, rule, doc, num_queries=n_q)
    n_k = seg.shape[1]
    for b in range(seg.shape[0]):
        for i in range(classes.shape[1]):
            for j in range(classes.shape[2]):
                tile = mask[b, i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
                c = int(classes[b, i, j])
                if c == TILE_EMPTY:
                    assert not tile.any(), (b, i, j)
                if c == TILE_FULL:
                    assert tile.all() and tile.shape == (bm, bn), (b, i, j)
    return classes


@pytest.mark.parametrize("rule", sorted(RULES))
def test_livr_layout_tiles(rule):
    seg = livr_layout(2, 150, pad=11)
    classes = check_tiles(seg, packed_docs(2, 150, 2), rule, 16, 32, 150)
    assert (classes == TILE_FULL).any() and (classes == TILE_EMPTY).any()


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 90),
    kinds=st.lists(st.integers(0, 4), min_size=90, max_size=90),
    run=st.integers(1, 20),
    docs=st.lists(st.integers(0, 3), min_size=90, max_size=90),
    use_docs=st.booleans(),
    rule=st.sampled_from(sorted(RULES)),
    bm=st.sampled_from([8, 16]),
    bn=st.sampled_from([8, 16, 32]),
    n_q_fraction=st.floats(0.05, 1.0),
)
def test_random_layout_tiles_are_sound(n, kinds, run, docs, use_docs, rule, bm, bn, n_q_fraction):
    # Runs of equal kinds, like real prompts, so full and empty tiles actually occur.
    seg = torch.tensor([kinds[i // run] for i in range(n)]).unsqueeze(0)
    doc = torch.tensor(sorted(docs[:n])).unsqueeze(0) if use_docs else None
    check_tiles(seg, doc, rule, bm, bn, max(1, int(n * n_q_fraction)))


def test_summaries():
    seg = torch.tensor([[0, 1, 1, 4, 2, 3, 4]])
    doc = torch.tensor([[0, 0, 1, 9, 1, 1, 9]])
    s = summarize_blocks(seg, doc, 4)
    # The second block runs one position past the end.
    assert s.kinds.tolist() == [[0b10011, 0b11100 | (1 << PAST_END)]]
    assert s.doc_min.tolist() == [[0, 1]] and s.doc_max.tolist() == [[1, 1]]


def test_tile_mask_repr_counts_and_sparsity():
    seg = livr_layout(1, 256)
    tm = SegmentLayout(seg).tile_mask("bottleneck", 32, 32)
    counts = tm.counts()
    assert sum(counts.values()) == 64
    assert 0 < tm.sparsity() < 1
    assert tm.sparsity() == counts["empty"] / 64
    assert tm.causal_tiles() == 36
    text = repr(tm)
    assert "bottleneck" in text and "empty=" in text and "#" in text and "." in text
    standard = SegmentLayout(seg).tile_mask("standard", 32, 32)
    assert standard.counts()["empty"] == 64 - 36


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 200),
    n_q_fraction=st.floats(0.0, 1.0),
    bm=st.sampled_from([8, 16, 32, 64]),
    bn=st.sampled_from([8, 16, 32, 64]),
)
def test_causal_tiles_are_classified_exactly(n, n_q_fraction, bm, bn):
    # All TEXT under "standard": only position decides, so every tile's class is exact, not just sound.
    n_q = max(1, round(n * n_q_fraction))
    seg = torch.zeros(1, n, dtype=torch.long)
    classes = SegmentLayout(seg).tile_mask("standard", bm, bn, num_queries=n_q).to_dense()[0]
    mask = segment_mask(seg, "standard", num_queries=n_q)[0]
    for i in range(classes.shape[0]):
        for j in range(classes.shape[1]):
            tile = mask[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            whole = tile.shape == (bm, bn)
            want = TILE_EMPTY if not tile.any() else TILE_FULL if tile.all() and whole else TILE_PARTIAL
            assert int(classes[i, j]) == want, (i, j)


@pytest.mark.parametrize("by_key", [False, True])
def test_schedule_order_launches_the_longest_rows_first(by_key):
    seg = livr_layout(3, 200, pad=40)
    layout = SegmentLayout(seg, packed_docs(3, 200, 3))
    schedule = layout.schedule(RULES["bottleneck"], 32, 16, 200, by_key=by_key)
    tiles = schedule.tiles_per_row.flatten()
    order = schedule.order.tolist()
    assert sorted(order) == list(range(tiles.numel()))
    ordered = tiles[schedule.order]
    assert (ordered[:-1] >= ordered[1:]).all(), ordered
    # Rows with as many tiles keep their row order.
    assert all(a < b for a, b in zip(order, order[1:]) if tiles[a] == tiles[b])
    assert order != sorted(order), "the layout should not be in longest-first order already"


def test_padded_ids_fill_whole_key_tiles_with_pad():
    """The forward reads whole key tiles of ids without a bounds mask: rows padded to the tile
    size with kind PAD (never allowed) and document -1, cached per size, not carried by extend."""
    seg = livr_layout(2, 50, pad=3)
    doc = packed_docs(2, 50, 3)
    layout = SegmentLayout(seg, doc)
    segment_ids, doc_ids = layout.padded_ids(16)
    assert segment_ids.shape == doc_ids.shape == (2, 64) and segment_ids.is_contiguous()
    assert torch.equal(segment_ids[:, :50], layout.segment_ids) and torch.equal(doc_ids[:, :50], layout.doc_ids)
    assert (segment_ids[:, 50:] == int(Segment.PAD)).all() and (doc_ids[:, 50:] == -1).all()
    assert layout.padded_ids(16)[0] is segment_ids
    assert layout.padded_ids(64)[0].shape == (2, 64) and layout.padded_ids(32)[0].shape == (2, 64)
    assert SegmentLayout(seg).padded_ids(16)[1] is None
    longer = layout.extend(seg[:, :3])
    assert longer.padded_ids(16)[0].shape == (2, 64) and torch.equal(longer.padded_ids(16)[0][:, 50:53], seg[:, :3])
