"""Choosing tile configs on the user's GPU: time a small space once per shape bucket, cache on disk.

A config changes the host side too (the tile schedules are built per tile shape), so the unit
tuned is a whole forward + backward (three kernels and their schedules), not one kernel: each
candidate of ``config.tuning_space`` runs on the caller's tensors and layout, the fastest wins.
Results are keyed by GPU, dtype, head dim, head counts, doc ids and a sequence-length bucket, kept
in memory and written through Triton's cache manager (the directory Triton's own autotuner uses,
``TRITON_CACHE_DIR``), so a second process does not tune again.

Every candidate's output and gradients are compared with the first candidate's (the static table,
which the CUDA tests check against float64): a config whose results differ by more than
``AGREEMENT_TOLERANCE`` of their norm on this GPU (a compiler bug for one tile shape, say) is
skipped with a warning, however fast it runs.

Off under the Triton interpreter and on CPU tensors; ``LIVR_AUTOTUNE=0`` pins the static table.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import triton

from .blocks import SegmentLayout
from .config import KernelConfig, default_config, head_dim_block, triton_version, tuning_space
from .segments import AttentionRule

ENV_VAR = "LIVR_AUTOTUNE"
# Sequence lengths share a tuned config within a power-of-two bucket, at least this long.
MIN_BUCKET = 1024
CACHE_FILE = "livr_tuned_config.json"
# Bump when the kernels or the space change so old timings mislead (2: launch order; 3: TMA loads;
# 4: atomic dQ).
CACHE_VERSION = 4
WARMUP_MS = 5
REPEAT_MS = 25

# A candidate agrees with the reference when each output and gradient is within this fraction of
# the reference's norm. Tile shapes only reorder fp32 sums, which moves a half-precision element by
# an ulp or two (2^-8 relative for bf16 at most); a miscompile breaks whole tiles or rows. Norms, not
# a max over the tensor's largest element: dK and dV peak in a few short causal rows, so a max-based
# bound would let a broken tile through.
AGREEMENT_TOLERANCE = 1e-2

_memory: Dict[Tuple, KernelConfig] = {}

Benchmark = Callable[[KernelConfig], float]
Outputs = Callable[[KernelConfig], Sequence[torch.Tensor]]


class DisagreeingConfig(RuntimeError):
    """A candidate config whose results differ from the static table's on this GPU."""


def agreement_error(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """Largest ||got - want|| / ||want|| over the tensor pairs (fp32 norms); inf on NaN."""
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        a, b = a.float(), b.float()
        error = ((a - b).norm() / b.norm().clamp_min(torch.finfo(torch.float32).tiny)).item()
        if error != error:
            return float("inf")
        worst = max(worst, error)
    return worst


def checked_benchmark(outputs: Outputs, timed: Benchmark) -> Benchmark:
    """``timed`` for candidates whose ``outputs`` agree with the reference's: the first candidate
    that runs (the static table, first in ``tuning_space``, unless it fails here). The others raise
    ``DisagreeingConfig`` (and warn), so ``tune`` skips them."""
    reference: List[Tuple[KernelConfig, Sequence[torch.Tensor]]] = []

    def benchmark(config: KernelConfig) -> float:
        got = outputs(config)
        if not reference:
            reference.append((config, got))
        else:
            error = agreement_error(got, reference[0][1])
            if not error <= AGREEMENT_TOLERANCE:
                message = (f"livr autotune: {config} gives results {error:.3g} of their norm away from those of "
                           f"{reference[0][0]} (allowed {AGREEMENT_TOLERANCE}) on this GPU; not used")
                warnings.warn(message, RuntimeWarning, stacklevel=2)
                raise DisagreeingConfig(message)
        return timed(config)

    return benchmark


def autotune_enabled(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def length_bucket(n: int) -> int:
    """Power-of-two bucket of a sequence length (at least MIN_BUCKET): 1000 -> 1024, 5000 -> 8192."""
    return max(MIN_BUCKET, triton.next_power_of_2(max(1, n)))


def tuning_key(
    device_name: str, capability: Tuple[int, int], dtype: torch.dtype, head_dim: int,
    q_heads: int, kv_heads: int, n: int, has_docs: bool, deterministic: bool = False,
) -> Tuple:
    # Deterministic runs tune without the atomic dQ candidate, so they keep a choice of their own.
    return (device_name, tuple(capability), str(dtype), head_dim, q_heads, kv_heads, length_bucket(n), has_docs,
            deterministic, triton_version(), CACHE_VERSION)


def _cache_manager(key: Tuple):
    from triton.runtime.cache import get_cache_manager

    return get_cache_manager(hashlib.sha256(repr(key).encode()).hexdigest())


def load_cached(key: Tuple) -> Optional[KernelConfig]:
    path = _cache_manager(key).get_file(CACHE_FILE)
    if path is None:
        return None
    with open(path) as f:
        record = json.load(f)
    if record.get("key") != repr(key):
        return None
    return KernelConfig(**record["config"])


def store(key: Tuple, config: KernelConfig, timings: Sequence[Tuple[KernelConfig, float]]) -> None:
    record = {
        "key": repr(key),
        "config": asdict(config),
        "timings_ms": [{"config": asdict(c), "ms": t} for c, t in timings],
    }
    _cache_manager(key).put(json.dumps(record, indent=1), CACHE_FILE, binary=False)


def tune(key: Tuple, candidates: List[KernelConfig], benchmark: Benchmark) -> KernelConfig:
    """The fastest candidate by ``benchmark`` (milliseconds); a candidate that fails to run is skipped.

    Memory first, then the disk cache, then timing every candidate (and storing the winner).
    """
    if key in _memory:
        return _memory[key]
    cached = load_cached(key)
    if cached is None:
        timings = []
        for candidate in candidates:
            try:
                timings.append((candidate, benchmark(candidate)))
            except Exception:  # out of shared memory or registers on this GPU: not a candidate here
                continue
        if not timings:
            raise RuntimeError(f"no tile config of {len(candidates)} candidates ran for {key}")
        cached = min(timings, key=lambda item: item[1])[0]
        store(key, cached, timings)
    _memory[key] = cached
    return cached


def _time_forward_backward(q, k, v, layout: SegmentLayout, rule: AttentionRule, scale: float) -> Benchmark:
    from triton.testing import do_bench

    from .backward import segment_attention_bwd
    from .forward import segment_attention_fwd, tma_descriptors

    q, k, v = (t.detach() for t in (q, k, v))
    do = torch.randn_like(q)

    def step(config: KernelConfig):
        o, lse = segment_attention_fwd(q, k, v, layout, rule, scale, config)
        return (o,) + tuple(segment_attention_bwd(do, q, k, v, o, lse, layout, rule, scale, config))

    def outputs(config: KernelConfig):
        # Checked once per candidate (checked_benchmark calls this before timing), not in the timed loop.
        if config.fwd_tma and tma_descriptors(k, v, config.fwd_block_n, head_dim_block(q.shape[-1])) is None:
            # It would time (and check) the pointer loads, yet be stored for tensors that take TMA.
            raise ValueError(f"{config}: these K and V cannot take TMA loads, so this candidate cannot be timed here")
        return step(config)

    def timed(config: KernelConfig) -> float:
        return do_bench(lambda: step(config), warmup=WARMUP_MS, rep=REPEAT_MS)

    return checked_benchmark(outputs, timed)


def select_config(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout, rule: AttentionRule, scale: float,
    benchmark: Optional[Benchmark] = None,
) -> KernelConfig:
    """The config ``segment_attention`` launches with: tuned on CUDA, the static table otherwise."""
    head_dim = q.shape[-1]
    capability = torch.cuda.get_device_capability(q.device) if q.is_cuda else None
    if not autotune_enabled(q.device) or q.dtype == torch.float32:
        return default_config(head_dim, capability, q.dtype)
    deterministic = torch.are_deterministic_algorithms_enabled()
    key = tuning_key(
        torch.cuda.get_device_name(q.device), capability, q.dtype, head_dim, q.shape[1], k.shape[1], k.shape[2],
        layout.has_docs, deterministic,
    )
    candidates = tuning_space(head_dim, capability, q.dtype, deterministic)
    return tune(key, candidates, benchmark or _time_forward_backward(q, k, v, layout, rule, scale))
