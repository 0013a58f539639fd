"""One training step (forward + backward) of a Qwen2.5-VL-3B-shaped text stack with LIVR inputs.

Variants: ``livr`` (patch_attention, bottleneck rule: the segment kernel on CUDA, its dense
reference on CPU), ``sdpa_dense_mask`` (the model's own SDPA given the same rule as an explicit
4-D additive mask: what one does without livr), and ``sdpa_causal`` (plain causal SDPA, no LIVR
mask: the floor). Each reports its step time (pytest-benchmark) and peak memory of one step in
``extra_info``.

Sizes: Qwen2.5-VL-3B's hidden size 2048, 16 query heads, 2 key/value heads, head dim 128. On CUDA
the MLP width and vocabulary are the real ones too, with 4 of the 36 layers and 4096-token
sequences in bf16. On CPU the MLP width and vocabulary shrink and one layer runs on 320 tokens in
fp32, so the suite finishes in seconds; CPU timings say nothing about the kernel.

    python -m pytest benchmarks/test_model_step.py --benchmark-only
"""
from dataclasses import dataclass

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from livr_kernels import Segment, segment_mask
from livr_model import build_segment_ids, patch_attention

IGNORE_INDEX = -100
MIB = 2**20
VARIANTS = ("livr", "sdpa_dense_mask", "sdpa_causal")
RULE = "bottleneck"
IMAGE_TOKEN, VISION_START, VISION_END, VIDEO_TOKEN = 151655, 151652, 151653, 151656
NUM_LATENTS = 16


@dataclass(frozen=True)
class StepShape:
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    layers: int
    vocab: int
    batch: int
    seq_len: int
    image_tokens: int
    answer_tokens: int
    dtype: torch.dtype
    rounds: int


QWEN25_VL_3B = dict(hidden=2048, heads=16, kv_heads=2)
CUDA_SHAPE = StepShape(
    **QWEN25_VL_3B, intermediate=11008, layers=4, vocab=151936, batch=2, seq_len=4096,
    image_tokens=2592, answer_tokens=64, dtype=torch.bfloat16, rounds=10,
)
CPU_SHAPE = StepShape(
    **QWEN25_VL_3B, intermediate=2048, layers=1, vocab=152064 // 64, batch=1, seq_len=320,
    image_tokens=196, answer_tokens=16, dtype=torch.float32, rounds=3,
)


def _shape(device: torch.device) -> StepShape:
    return CUDA_SHAPE if device.type == "cuda" else CPU_SHAPE


def _model(shape: StepShape, device: torch.device):
    # Token ids above the shrunken CPU vocabulary are remapped into it.
    specials = {name: min(tid, shape.vocab - 1 - i) for i, (name, tid) in enumerate(
        (("image", IMAGE_TOKEN), ("start", VISION_START), ("end", VISION_END), ("video", VIDEO_TOKEN)))}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
            num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
            max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        ),
        vision_config=dict(depth=1, hidden_size=64, intermediate_size=64, num_heads=2, out_hidden_size=shape.hidden),
        image_token_id=specials["image"], video_token_id=specials["video"],
        vision_start_token_id=specials["start"], vision_end_token_id=specials["end"],
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).to(device=device, dtype=shape.dtype)
    return model.train(), specials


def _inputs(shape: StepShape, specials: dict, device: torch.device):
    """[text, start, image x image_tokens, end, text, latents, text, answer]: image placeholders
    without pixel values (the frozen vision tower is not what is measured)."""
    generator = torch.Generator().manual_seed(0)
    n_text = shape.seq_len - shape.image_tokens - 2 - NUM_LATENTS - shape.answer_tokens
    head, tail = n_text // 2, n_text - n_text // 2
    latent_ids = list(range(shape.vocab - 4 - NUM_LATENTS, shape.vocab - 4))
    rows, labels = [], []
    for _ in range(shape.batch):
        text = torch.randint(0, latent_ids[0], (n_text + shape.answer_tokens,), generator=generator).tolist()
        ids = (
            text[:head] + [specials["start"]] + [specials["image"]] * shape.image_tokens + [specials["end"]]
            + text[head:head + tail] + latent_ids + text[n_text:]
        )
        rows.append(ids)
        labels.append([IGNORE_INDEX] * (shape.seq_len - shape.answer_tokens) + ids[-shape.answer_tokens:])
    batch = {
        "input_ids": torch.tensor(rows, device=device),
        "attention_mask": torch.ones(shape.batch, shape.seq_len, dtype=torch.long, device=device),
        "labels": torch.tensor(labels, device=device),
    }
    return batch, latent_ids


def _dense_mask_inputs(batch, segment_ids, dtype):
    allowed = segment_mask(segment_ids, RULE)[:, None]
    additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return dict(batch, attention_mask=additive)


def _train_step(model, inputs):
    loss = model(**inputs).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.detach()


def _peak_step_memory_mib(step, device: torch.device):
    """Peak memory allocated during one step above what was live before it: the CUDA allocator's
    peak, or on CPU the allocation timeline recorded by the torch profiler (None if unavailable)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / MIB
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import Action
    except ImportError:
        return None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak / MIB


@pytest.fixture(scope="module")
def setup():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = _shape(device)
    model, specials = _model(shape, device)
    batch, latent_ids = _inputs(shape, specials, device)
    segment_ids = build_segment_ids(
        batch["input_ids"], image_token_ids=(specials["image"],), latent_token_ids=latent_ids, labels=batch["labels"]
    )
    assert int((segment_ids == int(Segment.IMAGE)).sum()) == shape.batch * shape.image_tokens
    reference_loss = _train_step(model, _dense_mask_inputs(batch, segment_ids, shape.dtype))
    return dict(device=device, shape=shape, model=model, batch=batch, latent_ids=latent_ids, specials=specials,
                segment_ids=segment_ids, reference_loss=reference_loss)


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_train_step(benchmark, setup, variant):
    device, shape, model, batch = setup["device"], setup["shape"], setup["model"], setup["batch"]
    handle = None
    if variant == "livr":
        handle = patch_attention(model, rule=RULE, latent_token_ids=setup["latent_ids"])
        inputs = batch
    elif variant == "sdpa_dense_mask":
        inputs = _dense_mask_inputs(batch, setup["segment_ids"], shape.dtype)
    else:
        inputs = batch
    try:
        loss = _train_step(model, inputs)
        if variant != "sdpa_causal":
            tolerance = 2e-2 if shape.dtype == torch.bfloat16 else 1e-4
            assert abs(loss.item() - setup["reference_loss"].item()) < tolerance

        def step():
            _train_step(model, inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()

        peak = _peak_step_memory_mib(step, device)
        benchmark.pedantic(step, rounds=shape.rounds, warmup_rounds=1, iterations=1)
    finally:
        if handle is not None:
            handle.remove()
    benchmark.extra_info.update(
        variant=variant,
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        dtype=str(shape.dtype).replace("torch.", ""),
        batch=shape.batch,
        seq_len=shape.seq_len,
        layers=shape.layers,
        hidden=shape.hidden,
        heads=f"{shape.heads}q/{shape.kv_heads}kv",
        peak_memory_mib=None if peak is None else round(peak, 1),
    )
    if benchmark.stats is not None:
        benchmark.extra_info["median_step_s"] = benchmark.stats.stats.median


# Packed vs padded: examples of different lengths (a BLINK-like spread of image tokens), one
# micro-batch laid out each way; the same loss, and real (non-padding) tokens per second.
PACKING_LAYOUTS = ("padded", "packed")
CUDA_PACK_IMAGE_TOKENS = (2592, 648, 1296, 324)
CPU_PACK_IMAGE_TOKENS = (196, 49, 98, 25)


def _varied_examples(shape: StepShape, specials: dict, latent_ids: list, image_tokens) -> list:
    """1-D encoded examples like ``encode_example``'s, one per image size (no pixels: the frozen
    vision tower is not what is measured, so every token is text to the rotary embedding)."""
    generator = torch.Generator().manual_seed(1)
    examples = []
    for count in image_tokens:
        text = torch.randint(0, latent_ids[0], (48 + shape.answer_tokens,), generator=generator).tolist()
        ids = text[:24] + [specials["start"]] + [specials["image"]] * count + [specials["end"]] + text[24:48] + latent_ids + text[48:]
        ids_t = torch.tensor(ids)
        labels = torch.full_like(ids_t, IGNORE_INDEX)
        labels[-shape.answer_tokens:] = ids_t[-shape.answer_tokens:]
        examples.append({"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t), "labels": labels,
                         "mm_token_type_ids": torch.zeros_like(ids_t)})
    return examples


@pytest.mark.parametrize("layout", PACKING_LAYOUTS)
def test_model_train_step_packing(benchmark, setup, layout):
    from livr_model.packing import pack_examples
    from livr_model.prompts import collate

    device, shape, model = setup["device"], setup["shape"], setup["model"]
    image_tokens = CUDA_PACK_IMAGE_TOKENS if device.type == "cuda" else CPU_PACK_IMAGE_TOKENS
    examples = _varied_examples(shape, setup["specials"], setup["latent_ids"], image_tokens)
    padded = collate(examples, pad_token_id=0)
    if layout == "packed":
        batch = pack_examples(examples, None, model_or_config=model, pad_token_id=0)
    else:
        batch = padded
    inputs = {k: v.to(device) for k, v in batch.items()}
    real_tokens = int(padded["attention_mask"].sum())
    handle = patch_attention(model, rule=RULE, latent_token_ids=setup["latent_ids"])
    try:
        loss = _train_step(model, inputs)
        reference = _train_step(model, {k: v.to(device) for k, v in padded.items()})
        tolerance = 2e-2 if shape.dtype == torch.bfloat16 else 1e-4
        assert abs(loss.item() - reference.item()) < tolerance

        def step():
            _train_step(model, inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()

        benchmark.pedantic(step, rounds=shape.rounds, warmup_rounds=1, iterations=1)
    finally:
        handle.remove()
    benchmark.extra_info.update(
        layout=layout, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        dtype=str(shape.dtype).replace("torch.", ""), examples=len(examples), real_tokens=real_tokens,
        shape=list(inputs["input_ids"].shape), layers=shape.layers,
    )
    if benchmark.stats is not None:
        benchmark.extra_info["median_step_s"] = benchmark.stats.stats.median
        benchmark.extra_info["real_tokens_per_s"] = round(real_tokens / benchmark.stats.stats.median)
