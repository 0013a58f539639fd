import pytest
import torch

from livr_kernels import RULES, AttentionRule, Segment, resolve_rule

T, I, L, A, P = Segment.TEXT, Segment.IMAGE, Segment.LATENT, Segment.ANSWER, Segment.PAD


def test_kind_ids_match_design():
    assert [int(s) for s in (T, I, L, A, P)] == [0, 1, 2, 3, 4]


def test_standard_allows_every_non_pad_pair():
    rule = RULES["standard"]
    for q in Segment:
        for k in Segment:
            assert rule.allows(q, k) == (q != P and k != P)


def test_bottleneck_blocks_text_and_answer_from_image_only():
    rule = RULES["bottleneck"]
    blocked = {(q, k) for q in Segment for k in Segment if q != P and k != P and not rule.allows(q, k)}
    assert blocked == {(T, I), (A, I)}
    assert rule.allows(L, I) and rule.allows(I, I) and rule.allows(A, L)


def test_answer_only_ablation_blocks_answer_to_image_and_nothing_else():
    rule = RULES["bottleneck_answer_only"]
    blocked = {(q, k) for q in Segment for k in Segment if q != P and k != P and not rule.allows(q, k)}
    assert blocked == {(A, I)}


def test_custom_rule_and_pad_forced_off():
    table = [[True] * 5 for _ in range(5)]
    rule = AttentionRule("all_true_table", tuple(map(tuple, table)))
    assert not rule.allows(P, T) and not rule.allows(T, P)
    assert rule.allows(T, I)


def test_bits_encode_the_table():
    rule = RULES["bottleneck"]
    for q in Segment:
        for k in Segment:
            assert bool((rule.bits >> (int(q) * 5 + int(k))) & 1) == rule.allows(q, k)


def test_table_tensor_and_repr():
    rule = RULES["bottleneck"]
    assert rule.table().shape == (5, 5) and rule.table().dtype == torch.bool
    text = repr(rule)
    assert "bottleneck" in text and "ANSWER" in text


def test_bad_rules():
    with pytest.raises(ValueError, match="5x5"):
        AttentionRule("bad", ((True,),))
    with pytest.raises(ValueError, match="rule must be one of"):
        resolve_rule("causal")
    with pytest.raises(ValueError, match="rule must be a rule name"):
        resolve_rule(3)
    assert resolve_rule(RULES["standard"]) is RULES["standard"]
