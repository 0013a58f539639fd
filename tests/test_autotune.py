"""Autotuning logic on CPU: the space, the length buckets, the switch, and the disk cache."""
import dataclasses

import pytest
import torch

from livr_kernels import autotune
from livr_kernels.config import KernelConfig, default_config, tuning_space

# bf16 output of a 96-key softmax against float64: a few bf16 ulps. Kernels whose dots returned
# garbage (the unpatched interpreter) miss it by orders of magnitude.
BF16_OUTPUT_TOLERANCE = 2e-2


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    monkeypatch.setattr(autotune, "_memory", {})


def _key(n=4096):
    return autotune.tuning_key("NVIDIA H100", (9, 0), torch.bfloat16, 128, 16, 2, n, False)


@pytest.mark.parametrize("n,bucket", [(1, 1024), (1000, 1024), (1024, 1024), (1025, 2048), (5000, 8192), (16384, 16384)])
def test_length_bucket(n, bucket):
    assert autotune.length_bucket(n) == bucket
    assert _key(n) == _key(bucket)


def test_keys_separate_what_changes_the_best_tiles():
    base = _key()
    assert base != _key(8192)
    assert base != autotune.tuning_key("NVIDIA H100", (9, 0), torch.float16, 128, 16, 2, 4096, False)
    assert base != autotune.tuning_key("NVIDIA H100", (9, 0), torch.bfloat16, 128, 16, 2, 4096, True)
    assert base != autotune.tuning_key("NVIDIA A100", (8, 0), torch.bfloat16, 128, 16, 2, 4096, False)
    assert base != autotune.tuning_key("NVIDIA H100", (9, 0), torch.bfloat16, 128, 16, 2, 4096, False, True)


def test_switch(monkeypatch):
    cuda = torch.device("cuda")
    assert not autotune.autotune_enabled(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not autotune.autotune_enabled(cuda)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("LIVR_AUTOTUNE", raising=False)
    assert autotune.autotune_enabled(cuda), "on by default on CUDA"
    for off in ("0", "false", "off"):
        monkeypatch.setenv("LIVR_AUTOTUNE", off)
        assert not autotune.autotune_enabled(cuda)
    monkeypatch.setenv("LIVR_AUTOTUNE", "1")
    assert autotune.autotune_enabled(cuda)


@pytest.mark.parametrize("capability", [(8, 0), (8, 9), (9, 0), (10, 0), (12, 0)])
def test_space_starts_with_the_table_and_varies_one_axis_at_a_time(capability):
    space = tuning_space(128, capability, torch.bfloat16)
    base = default_config(128, capability, torch.bfloat16)
    assert space[0] == base and len(space) == len(set(space)) >= 4
    for config in space[1:]:
        changed = [f.name for f in dataclasses.fields(KernelConfig) if getattr(config, f.name) != getattr(base, f.name)]
        assert len(changed) == 1, changed
    assert any(c.fwd_block_n == 2 * base.fwd_block_n for c in space)
    assert [c.longest_first for c in space].count(False) == 1
    # TMA loads only on Hopper, where compiling them saves registers (Blackwell's loops grow).
    assert [c.fwd_tma for c in space].count(True) == (1 if capability == (9, 0) else 0)
    # Atomic dQ everywhere, but never when torch is asked for deterministic algorithms.
    assert [c.dq_atomic for c in space].count(True) == 1
    deterministic = tuning_space(128, capability, torch.bfloat16, deterministic=True)
    assert not any(c.dq_atomic for c in deterministic) and deterministic == [c for c in space if not c.dq_atomic]
    deeper = [c.num_stages for c in space if c.num_stages != base.num_stages]
    # Deeper pipelines only where shared memory is large (sm_90, sm_100); shallower elsewhere.
    assert deeper == ([base.num_stages + 1] if capability in ((9, 0), (10, 0)) else [base.num_stages - 1])


def test_space_is_the_table_alone_for_fp32_and_d256():
    assert tuning_space(64, (9, 0), torch.float32) == [default_config(64, (9, 0), torch.float32)]
    assert tuning_space(256, (9, 0), torch.bfloat16) == [default_config(256, (9, 0), torch.bfloat16)]


def test_tune_picks_the_fastest_stores_it_and_reads_it_back():
    space = tuning_space(128, (9, 0), torch.bfloat16)
    times = {c: 1.0 + i for i, c in enumerate(space)}
    fastest = space[3]
    times[fastest] = 0.5
    tried = []

    def bench(config):
        tried.append(config)
        return times[config]

    assert autotune.tune(_key(), space, bench) == fastest
    assert tried == space
    # Same process: memory, no timing. New process (memory cleared): the disk cache, no timing.
    assert autotune.tune(_key(), space, bench) == fastest and len(tried) == len(space)
    autotune._memory.clear()

    def must_not_run(config):
        raise AssertionError("timed although the result was on disk")

    assert autotune.tune(_key(), space, must_not_run) == fastest
    # Another bucket is tuned afresh.
    assert autotune.tune(_key(16384), space, bench) == fastest and len(tried) == 2 * len(space)


def test_candidates_that_fail_are_skipped():
    space = tuning_space(128, (9, 0), torch.bfloat16)

    def bench(config):
        if config is space[0]:
            raise RuntimeError("out of resources: shared memory")
        return 2.0 if config is space[1] else 3.0

    assert autotune.tune(_key(), space, bench) == space[1]
    with pytest.raises(RuntimeError, match="no tile config"):
        autotune.tune(_key(2048), space, lambda config: 1 / 0)


def test_cpu_tensors_use_the_static_table_without_timing():
    q = torch.randn(1, 4, 64, 128, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 64, 128, dtype=torch.bfloat16)
    from livr_kernels import SegmentLayout

    layout = SegmentLayout(torch.zeros(1, 64, dtype=torch.long))

    def must_not_run(config):
        raise AssertionError("timed on CPU")

    got = autotune.select_config(q, k, k, layout, None, 1.0, benchmark=must_not_run)
    assert got == default_config(128, None, torch.bfloat16)


def test_a_candidate_that_computes_something_else_is_skipped_however_fast():
    space = tuning_space(128, (9, 0), torch.bfloat16)
    grad = torch.full((64, 64), 0.05)
    grad[-4:] = 5.0  # large values in a few rows, as dK/dV have in short causal rows
    right = (torch.ones(64, 64), grad)
    broken_tile = grad.clone()
    broken_tile[:16, :16] = -0.05  # one 16 x 16 tile of small values wrong: far below the largest value
    wrong = {space[2]: (torch.ones(64, 64), broken_tile),
             space[3]: (torch.full((64, 64), float("nan")), grad)}
    # Tile shapes reorder sums: every element an ulp (2^-8) off must still count as agreeing.
    nearly = {space[1]: (torch.ones(64, 64) * (1 + 2 ** -8), grad * (1 - 2 ** -8))}

    def outputs(config):
        return wrong.get(config) or nearly.get(config) or right

    times = {c: 1.0 for c in space}
    times.update({space[1]: 0.9, space[2]: 0.1, space[3]: 0.2})
    benchmark = autotune.checked_benchmark(outputs, lambda config: times[config])
    with pytest.warns(RuntimeWarning, match="of their norm away from those of") as caught:
        assert autotune.tune(_key(), space, benchmark) == space[1]
    assert len(caught) == 2


def test_real_tile_shapes_agree_within_the_tolerance():
    """Two tile configs of the interpreted kernels on one bf16 problem: far inside the tolerance."""
    import dataclasses

    from kernel_cases import livr_layout, random_qkv
    from livr_kernels import SegmentLayout, reference_attention, resolve_rule
    from livr_kernels._interpreter import patch_interpreter
    from livr_kernels.backward import segment_attention_bwd
    from livr_kernels.forward import segment_attention_fwd

    base = KernelConfig(fwd_block_m=16, fwd_block_n=16, dkv_block_m=16, dkv_block_n=32, dq_block_m=32, dq_block_n=16)
    other = dataclasses.replace(base, fwd_block_n=32, dkv_block_m=32, dq_block_n=32, longest_first=False)
    # CPU tensors run under the interpreter, which conftest turns on only where there is no GPU.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        # The launchers, called directly, skip segment_attention's interpreter fixes: without them
        # Triton 3.6 refuses the tile loops and Triton 3.9's bf16 dots return garbage.
        patch_interpreter()
    seg = livr_layout(1, 96, pad=5).to(device)
    layout = SegmentLayout(seg)
    q, k, v, do = (t.detach().to(device, torch.bfloat16) for t in random_qkv(1, 4, 2, 96, 96, 32))

    def outputs(config):
        o, lse = segment_attention_fwd(q, k, v, layout, resolve_rule("bottleneck"), 32 ** -0.5, config)
        return (o,) + tuple(segment_attention_bwd(do, q, k, v, o, lse, layout, resolve_rule("bottleneck"), 32 ** -0.5, config))

    got = outputs(base)
    want = reference_attention(q.double(), k.double(), v.double(), seg, "bottleneck")
    assert (got[0].double() - want).abs().max().item() < BF16_OUTPUT_TOLERANCE, "the reference config itself is wrong"
    error = autotune.agreement_error(outputs(other), got)
    assert error < autotune.AGREEMENT_TOLERANCE / 5, error


def test_agreement_error_is_the_worst_of_all_pairs():
    """A wrong output must count even when a later tensor (a gradient) agrees exactly."""
    want = (torch.ones(8, 8), torch.ones(8, 8))
    wrong_first = (torch.ones(8, 8) * 1.5, torch.ones(8, 8))
    assert autotune.agreement_error(wrong_first, want) == pytest.approx(0.5)
    wrong_second = (torch.ones(8, 8), torch.ones(8, 8) * 0.75)
    assert autotune.agreement_error(wrong_second, want) == pytest.approx(0.25)


def test_tuned_candidates_are_compared_on_the_output_and_every_gradient(monkeypatch):
    """What the tuner checks per candidate: the output, dQ, dK and dV of the real kernels, as the
    float64 reference computes them (a check on the output alone would pass a config whose
    backward tiles are broken)."""
    from kernel_cases import livr_layout, random_qkv
    from livr_kernels import SegmentLayout, reference_attention, resolve_rule

    device = "cuda" if torch.cuda.is_available() else "cpu"
    captured = {}
    monkeypatch.setattr(autotune, "checked_benchmark", lambda outputs, timed: captured.setdefault("outputs", outputs))
    seg = livr_layout(1, 40, pad=3)
    q, k, v, _ = (t.detach().to(device) for t in random_qkv(1, 2, 1, 40, 40, 16))
    rule = resolve_rule("bottleneck")
    torch.manual_seed(1)
    autotune._time_forward_backward(q, k, v, SegmentLayout(seg.to(device)), rule, 16 ** -0.5)
    torch.manual_seed(1)
    do = torch.randn_like(q)  # the upstream gradient the tuner draws
    config = KernelConfig(fwd_block_m=16, fwd_block_n=16, dkv_block_m=16, dkv_block_n=16, dq_block_m=16, dq_block_n=16)
    got = captured["outputs"](config)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out64 = reference_attention(q64, k64, v64, seg.to(device), rule)
    want = (out64,) + torch.autograd.grad(out64, (q64, k64, v64), do.double())
    assert len(got) == len(want) == 4
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4, msg=name)


def test_a_tma_candidate_is_skipped_where_the_tuning_tensors_cannot_take_tma(monkeypatch):
    """K and V the copy engine cannot read make a TMA config run pointer loads: timed so, it could
    win on noise and be stored for the length bucket, then run TMA loads on aligned tensors that the
    agreement check never compared. The candidate raises instead (``tune`` skips it)."""
    from kernel_cases import livr_layout, random_qkv
    from livr_kernels import SegmentLayout, resolve_rule

    device = "cuda" if torch.cuda.is_available() else "cpu"
    captured = {}
    monkeypatch.setattr(autotune, "checked_benchmark", lambda outputs, timed: captured.setdefault("outputs", outputs))
    q, k, v, _ = (t.detach().to(device) for t in random_qkv(1, 2, 1, 20, 20, 16))
    k = torch.zeros(20 * 16 + 1, device=device)[1:].view(1, 1, 20, 16).copy_(k)  # base 4 bytes past alignment
    autotune._time_forward_backward(q, k, v, SegmentLayout(livr_layout(1, 20).to(device)), resolve_rule("bottleneck"), 0.25)
    config = KernelConfig(fwd_block_m=16, fwd_block_n=16, dkv_block_m=16, dkv_block_n=16, dq_block_m=16, dq_block_n=16)
    assert len(captured["outputs"](config)) == 4
    with pytest.raises(ValueError, match="TMA"):
        captured["outputs"](dataclasses.replace(config, fwd_tma=True))
