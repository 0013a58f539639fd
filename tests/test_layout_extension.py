"""SegmentLayout.extend (a decode step) against the layout built whole, when the new tokens land in
a block the prompt left partly filled with other kinds."""
import pytest
import torch

from livr_kernels import RULES, Segment, SegmentLayout

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
