"""SegmentLayout.extend (a decode step) against the layout built whole, when the new tokens land in
a block the prompt left partly filled with other kinds, or bring document ids that relabel the cached ones."""
import pytest
import torch

from livr_kernels import RULES, Segment, SegmentLayout, segment_mask
from livr_kernels.blocks import TILE_EMPTY

BLOCK = 16
# A prompt that ends inside a block holding only IMAGE tokens: the decoded ANSWER tokens join that block.
PROMPT = [int(Segment.TEXT)] * 5 + [int(Segment.IMAGE)] * 15


@pytest.mark.parametrize("new_tokens", [1, 3, 13])
def test_a_partial_block_is_summarised_again_after_extension(new_tokens):
    prompt = torch.tensor([PROMPT])
    layout = SegmentLayout(prompt)
    layout.summary(BLOCK)  # cached, as after a prefill
    new = torch.full((1, new_tokens), int(Segment.ANSWER))
    extended = layout.extend(new)
    whole = SegmentLayout(torch.cat([prompt, new], 1))
    assert torch.equal(extended.summary(BLOCK).kinds, whole.summary(BLOCK).kinds)
    # A stale summary ({IMAGE} alone) would make the ANSWER queries' own block empty under the bottleneck.
    rule = RULES["bottleneck"]
    tiles = extended.tile_mask(rule, BLOCK, BLOCK, num_queries=new_tokens).to_dense()
    assert torch.equal(tiles, whole.tile_mask(rule, BLOCK, BLOCK, num_queries=new_tokens).to_dense())


def test_new_document_ids_that_sort_first_relabel_the_carried_summaries():
    """A decode step whose new document id sorts before the cached ones relabels every cached token's
    document (labels are ranks). The key summaries carried over kept the old labels, so a cached block
    of the query's own document (20: label 1 before, 2 after) looked like another document and its
    tile was EMPTY: the query lost attention to its own document. Found by
    tests/test_tiles_properties.py::test_extension_equals_the_layout_built_whole."""
    rule = RULES["standard"]
    kinds = torch.zeros(1, 2 * BLOCK, dtype=torch.long)
    layout = SegmentLayout(kinds, torch.tensor([[10] * BLOCK + [20] * BLOCK]))
    layout.schedule(rule, BLOCK, BLOCK, 2 * BLOCK)  # cached, as after a prefill
    token = torch.zeros(1, 1, dtype=torch.long)
    layout = layout.extend(token, torch.tensor([[5]])).extend(token, torch.tensor([[20]]))
    all_docs = torch.tensor([[10] * BLOCK + [20] * BLOCK + [5, 20]])
    whole = SegmentLayout(torch.zeros(1, 2 * BLOCK + 2, dtype=torch.long), all_docs)
    allowed = segment_mask(whole.segment_ids, rule, whole.doc_ids, num_queries=1)[0, 0]
    assert allowed[BLOCK:2 * BLOCK].all()  # the last query sees the cached block of its document
    tiles = layout.tile_mask(rule, BLOCK, BLOCK, num_queries=1).to_dense()
    assert tiles[0, 0, 1] != TILE_EMPTY
    assert torch.equal(tiles, whole.tile_mask(rule, BLOCK, BLOCK, num_queries=1).to_dense())
    assert torch.equal(layout.summary(BLOCK).doc_min, whole.summary(BLOCK).doc_min)


def test_new_document_ids_wider_than_the_cached_ones_keep_their_value():
    """New int64 document ids after int32 ones were cast to int32: 2**32 wrapped to 0 and the new
    token joined document 0, attending to it. Found by
    tests/test_tiles_properties.py::test_extension_equals_the_layout_built_whole (prompt ids given
    as int32)."""
    kinds = torch.zeros(1, 4, dtype=torch.long)
    layout = SegmentLayout(kinds, torch.tensor([[0, 0, 1, 1]], dtype=torch.int32))
    extended = layout.extend(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[2**32]]))
    assert extended.raw_doc_ids[0, -1] == 2**32
    allowed = segment_mask(extended.segment_ids, "standard", extended.doc_ids, num_queries=1)[0, 0]
    assert allowed.tolist() == [False, False, False, False, True]
    whole = SegmentLayout(torch.zeros(1, 5, dtype=torch.long), torch.tensor([[0, 0, 1, 1, 2**32]]))
    assert torch.equal(extended.doc_ids, whole.doc_ids)
