"""Two-stage LIVR trainer: LoRA on the language model, K trainable latent rows, answer-only loss.

Stage 1 trains with the bottleneck rule (prompt and answer tokens cannot see the image, so the
answer must read it through the latents); stage 2 returns to the standard causal mask. Each stage
has its own warmup + cosine schedule. The comparison modes of the paper differ only in what is put
into the prompt and which rule each stage uses:

========================  ===========================  =====================================
mode                      prompt                       stages (rule, epochs)
========================  ===========================  =====================================
``livr``                  question + K new latents     bottleneck e1, standard e2
``latents-only``          question + K new latents     standard e1, standard e2
``mask-only``             question + K existing tokens bottleneck e1, standard e2 (the K text
                                                       tokens are marked LATENT by position)
``sft``                   question                     standard, e1 + e2 epochs (one stage)
``image-twice``           every image given twice      standard, e1 + e2 epochs (one stage)
========================  ===========================  =====================================

The trainer runs under a plain ``python``, ``torchrun`` and ``accelerate launch`` (DDP, or FSDP
through an accelerate config): ``accelerate.Accelerator`` owns the process group and the device.
Data order is our own: the permutation of epoch e is a pure function of (seed, e) and each rank
takes its slice of every global batch, so a resumed run sees exactly the batches it would have.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from . import checkpoint as ckpt

MODES = ("sft", "livr", "latents-only", "mask-only", "image-twice")
LATENT_MODES = ("livr", "latents-only")
EVAL_METHODS = ("generate", "likelihood")
IGNORE_INDEX = -100
# The first update of a stage must not have lr 0: warmup factor is (s + 1) / (W + 1).
WARMUP_OFFSET = 1
# Candidate existing tokens for mask-only mode: the first that the tokenizer keeps as K separate
# single tokens is used to fill the K latent slots.
MASK_ONLY_FILLERS = (" .", ".", " _", "_", " ,", ",", " *", "*", " -", "-")
# Held-out fraction of the training data when no validation set is given.
DEFAULT_VAL_FRACTION = 0.1
# Training examples per synthetic task (the paper trains on 1k samples per task).
DEFAULT_SYNTHETIC_TRAIN = 1000
DEFAULT_SYNTHETIC_VAL = 200
DEFAULT_SYNTHETIC_IMAGE_SIZE = 56
# Encoded examples are cached in memory while their total size stays under this budget.
ENCODE_CACHE_BYTES = 2 << 30


@dataclass(frozen=True)
class Stage:
    name: str
    rule: str
    epochs: int


@dataclass
class TrainConfig:
    """Everything a run needs; defaults are the LIVR paper's (supplement) where it gives one."""

    model: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    data: str = ""
    val_data: Optional[str] = None
    val_fraction: float = DEFAULT_VAL_FRACTION
    mode: str = "livr"
    latents: int = 16
    stage_epochs: tuple = (4, 6)
    sft_epochs: Optional[int] = None
    output_dir: str = "livr_output"
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    batch_size: int = 1
    grad_accum: int = 8
    warmup_ratio: float = 0.05
    max_grad_norm: Optional[float] = 1.0
    reset_optimizer_per_stage: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    seed: int = 42
    gradient_checkpointing: bool = False
    bf16: bool = True
    max_length: Optional[int] = None
    eval_method: str = "generate"
    eval_rule: str = "standard"
    eval_batch_size: int = 8
    max_new_tokens: int = 16
    val_limit: Optional[int] = None
    save_steps: Optional[int] = None
    keep_checkpoints: int = 2
    max_steps: Optional[int] = None
    resume: bool = False
    synthetic_train_size: int = DEFAULT_SYNTHETIC_TRAIN
    synthetic_val_size: int = DEFAULT_SYNTHETIC_VAL
    synthetic_image_size: int = DEFAULT_SYNTHETIC_IMAGE_SIZE
    trust_remote_code: bool = False
    progress: bool = True

    def __post_init__(self):
        self.stage_epochs = tuple(int(e) for e in self.stage_epochs)
        self.betas = tuple(float(b) for b in self.betas)
        self.validate()

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {self.mode!r}")
        if len(self.stage_epochs) != 2 or any(e < 0 for e in self.stage_epochs) or sum(self.stage_epochs) == 0:
            raise ValueError(f"stage_epochs must be two non-negative epoch counts, not both 0; got {self.stage_epochs!r}")
        if self.sft_epochs is not None and self.sft_epochs < 1:
            raise ValueError(f"sft_epochs must be >= 1 or None; got {self.sft_epochs!r}")
        if self.latents < 1:
            raise ValueError(f"latents must be >= 1; got {self.latents!r}")
        for name in ("batch_size", "grad_accum", "eval_batch_size", "max_new_tokens", "keep_checkpoints", "lora_r"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1); got {self.warmup_ratio!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1); got {self.val_fraction!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0; got {self.lr!r}")
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two floats; got {self.betas!r}")
        if self.eval_method not in EVAL_METHODS:
            raise ValueError(f"eval_method must be one of {EVAL_METHODS}; got {self.eval_method!r}")
        for name in ("save_steps", "max_steps", "val_limit"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"{name} must be >= 1 or None; got {value!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stage_epochs"] = list(self.stage_epochs)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; known keys are {sorted(names)}")
        return cls(**d)

    @property
    def uses_new_latents(self) -> bool:
        return self.mode in LATENT_MODES

    @property
    def uses_latent_slots(self) -> bool:
        return self.mode in LATENT_MODES or self.mode == "mask-only"


def stage_plan(cfg: TrainConfig) -> list:
    """The stages a mode runs: rule and epochs of each."""
    e1, e2 = cfg.stage_epochs
    if cfg.mode in ("sft", "image-twice"):
        return [Stage(cfg.mode, "standard", cfg.sft_epochs if cfg.sft_epochs is not None else e1 + e2)]
    first_rule = "standard" if cfg.mode == "latents-only" else "bottleneck"
    stages = [Stage("stage1", first_rule, e1), Stage("stage2", "standard", e2)]
    return [s for s in stages if s.epochs > 0]


class StageSchedule:
    """LR factor per optimizer step: per stage, linear warmup over ``warmup_ratio`` of its steps then
    cosine decay to 0, restarted at each stage boundary. A plain object (not a closure) so LambdaLR
    can save it in its state dict."""

    def __init__(self, stage_steps: Sequence[int], warmup_ratio: float):
        if any(int(s) < 0 for s in stage_steps):
            raise ValueError(f"stage_steps must be non-negative; got {list(stage_steps)}")
        self.stage_steps = [int(s) for s in stage_steps]
        self.warmup_ratio = float(warmup_ratio)

    def locate(self, step: int) -> tuple:
        """(stage index, step inside that stage) of a global optimizer step."""
        start = 0
        for index, n in enumerate(self.stage_steps):
            if step < start + n:
                return index, step - start
            start += n
        return len(self.stage_steps) - 1, step - (start - self.stage_steps[-1])

    def __call__(self, step: int) -> float:
        index, local = self.locate(step)
        total = self.stage_steps[index]
        if total <= 0:
            return 0.0
        warmup = math.ceil(self.warmup_ratio * total)
        if local < warmup:
            return (local + WARMUP_OFFSET) / (warmup + WARMUP_OFFSET)
        progress = min(1.0, (local - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_order(num_examples: int, seed: int, epoch: int) -> list:
    """The example order of one epoch; depends only on (seed, epoch), never on global RNG state."""
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(num_examples, generator=generator).tolist()


def rank_batches(order: Sequence[int], batch_size: int, world_size: int, rank: int) -> list:
    """This rank's micro-batches of one epoch. A global micro-batch holds ``batch_size`` examples per
    rank; the order wraps around so every rank gets the same number of micro-batches (DDP needs it)."""
    if not order:
        raise ValueError("order must hold at least one example")
    global_batch = batch_size * world_size
    num_micro = math.ceil(len(order) / global_batch)
    padded = list(order) + [order[i % len(order)] for i in range(num_micro * global_batch - len(order))]
    return [padded[m * global_batch + rank * batch_size: m * global_batch + (rank + 1) * batch_size] for m in range(num_micro)]


def accumulation_groups(micro_batches: Sequence, grad_accum: int) -> list:
    """Micro-batches grouped into optimizer steps; the last group of an epoch may be shorter."""
    return [list(micro_batches[i:i + grad_accum]) for i in range(0, len(micro_batches), grad_accum)]


def steps_per_epoch(num_examples: int, cfg: TrainConfig, world_size: int) -> int:
    micro = math.ceil(num_examples / (cfg.batch_size * world_size))
    return math.ceil(micro / cfg.grad_accum)


def answer_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over the supervised (answer) positions only: position t predicts label t+1."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits (B, N, V) and labels (B, N) disagree: {tuple(logits.shape)} vs {tuple(labels.shape)}")
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    if not (shift_labels != IGNORE_INDEX).any():
        raise ValueError("labels supervise no token: every position is -100 (was the answer truncated?)")
    return torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


SYNTHETIC_PREFIX = "synthetic:"
BLINK_PREFIX = "blink:"
# Synthetic data does not move with --seed: train and validation draws are fixed and disjoint.
SYNTHETIC_TRAIN_SEED = 0
SYNTHETIC_VAL_SEED = 1
VAL_SPLIT_SALT = 7919
TINY_PROCESSOR_CLASS = "TinyQwen2_5_VLProcessor"
# Each process stages its RNG state here until the main process assembles the checkpoint.
RNG_STAGING_DIR = "rng-staging"


@dataclass
class StepInfo:
    """What ``step_callback`` sees after every optimizer step."""

    global_step: int
    stage: str
    rule: str
    epoch: int
    loss: float
    lr: float


@dataclass
class TrainResult:
    model: Any
    processor: Any
    handle: Any
    encoder: Any
    latent_token_ids: tuple
    state: ckpt.ResumeState
    selected_checkpoint: Optional[Path]
    train_examples: list
    val_examples: list
    accelerator: Any = None


def load_model_and_processor(name: str, *, trust_remote_code: bool = False, dtype: Optional[torch.dtype] = None):
    """(model, processor) from a hub id or a local folder (including the demo's tiny base)."""
    path = Path(name)
    if path.is_dir() and TINY_PROCESSOR_CLASS in _read_text(path / "processor_config.json"):
        from .tiny import load_tiny

        return load_tiny(path)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if dtype is None:
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
    return model, processor


def _read_text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def load_examples(spec: str, cfg: TrainConfig, *, split: str) -> list:
    """Examples from ``synthetic:<task>[,<task>]``, ``blink:<Subtask>`` or a JSONL path."""
    from . import data

    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val'; got {split!r}")
    if not isinstance(spec, str) or not spec:
        raise ValueError("data must be a JSONL path, blink:<Subtask> or synthetic:<task>[,<task>]; got an empty value")
    if spec.startswith(SYNTHETIC_PREFIX):
        tasks = [t.strip() for t in spec[len(SYNTHETIC_PREFIX):].split(",") if t.strip()]
        unknown = [t for t in tasks if t not in data.SYNTHETIC_TASKS]
        if not tasks or unknown:
            raise ValueError(f"data {spec!r}: synthetic tasks must be among {list(data.SYNTHETIC_TASKS)}; got {tasks}")
        n = cfg.synthetic_train_size if split == "train" else cfg.synthetic_val_size
        seed = SYNTHETIC_TRAIN_SEED if split == "train" else SYNTHETIC_VAL_SEED
        out = []
        for task in tasks:
            out.extend(data.make_synthetic_dataset(task, n, seed=seed, image_size=cfg.synthetic_image_size))
        return out
    if spec.startswith(BLINK_PREFIX):
        # BLINK publishes answers for its val split only; a training run holds part of it out.
        return data.load_blink(spec[len(BLINK_PREFIX):], "val")
    if not Path(spec).is_file():
        raise ValueError(f"data {spec!r} is not a file, nor blink:<Subtask>, nor synthetic:<task>[,<task>]")
    return data.load_jsonl(spec)


def prepare_data(cfg: TrainConfig) -> tuple:
    """(train, validation) examples. Without ``val_data`` a synthetic spec draws its own validation
    set; other data hold out ``val_fraction`` (a fixed, seeded choice)."""
    train_examples = load_examples(cfg.data, cfg, split="train")
    if cfg.val_data:
        return train_examples, load_examples(cfg.val_data, cfg, split="val")
    if cfg.data.startswith(SYNTHETIC_PREFIX):
        return train_examples, load_examples(cfg.data, cfg, split="val")
    if cfg.val_fraction <= 0:
        return train_examples, []
    order = random.Random(cfg.seed + VAL_SPLIT_SALT).sample(range(len(train_examples)), len(train_examples))
    n_val = max(1, round(cfg.val_fraction * len(train_examples)))
    if n_val >= len(train_examples):
        raise ValueError(f"val_fraction={cfg.val_fraction} leaves no training examples out of {len(train_examples)}")
    held = set(order[:n_val])
    return [e for i, e in enumerate(train_examples) if i not in held], [train_examples[i] for i in sorted(held)]


def make_encoder(cfg: TrainConfig, model, processor, latent_token_ids: Sequence[int]):
    from .archs import get_arch
    from .evaluate import PromptEncoder
    from .latents import latent_token_strings

    arch = get_arch(model)
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    return PromptEncoder(
        processor=processor,
        mode=cfg.mode,
        latent_text="".join(latent_token_strings(cfg.latents)) if cfg.uses_new_latents else "",
        latent_token_ids=tuple(int(i) for i in latent_token_ids),
        image_token_ids=arch.placeholder_token_ids(config),
        slot_count=cfg.latents if cfg.mode == "mask-only" else 0,
        max_length=cfg.max_length,
    )


def build_trainable_model(cfg: TrainConfig, model, processor):
    """Latent tokens (modes that add them), LoRA on the language model, everything else frozen,
    and the LIVR attention patch. Returns (peft model, handle, latent token ids)."""
    from peft import LoraConfig, get_peft_model

    from .archs import get_arch
    from .latents import add_latent_tokens, restrict_embedding_grad
    from .patch import patch_attention

    arch = get_arch(model)
    latent_ids = ()
    if cfg.uses_new_latents:
        latent_ids = tuple(int(i) for i in add_latent_tokens(model, processor, k=cfg.latents, seed=cfg.seed))
    for p in model.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=arch.lora_target_regex)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        peft_model = get_peft_model(model, lora)
    if latent_ids:
        restrict_embedding_grad(peft_model, latent_ids)
    if cfg.gradient_checkpointing:
        peft_model.get_base_model().activation_checkpointing_enable({"use_reentrant": False})
    handle = patch_attention(peft_model, rule=stage_plan(cfg)[0].rule, latent_token_ids=latent_ids)
    return peft_model, handle, latent_ids


def trainable_summary(model, latent_token_ids: Sequence[int]) -> str:
    """Trainable parameters by group: LoRA, latent embedding rows, anything else."""
    from .latents import DELTA_PARAMETER

    lora = latent = other = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(DELTA_PARAMETER):
            latent += p.numel()
        elif "lora_" in name:
            lora += p.numel()
        else:
            other += p.numel()
    total = sum(p.numel() for p in model.parameters())
    trainable = lora + latent + other
    lines = [
        f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)",
        f"  LoRA (language model attention + MLP): {lora:,}",
        f"  latent embedding rows ({len(latent_token_ids)} tokens): {latent:,}",
    ]
    if other:
        lines.append(f"  other: {other:,}")
    return "\n".join(lines)


def trainable_state_dict(model) -> dict:
    """Every trainable tensor by name (LoRA and the latent-row offset): the exact state to resume."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


class EncodedCache:
    """Encoded training examples, kept in memory while they fit ``ENCODE_CACHE_BYTES``; every
    example is encoded once up front so a bad one fails before training starts."""

    def __init__(self, encoder, examples: Sequence, *, budget: int = ENCODE_CACHE_BYTES):
        self.encoder = encoder
        self.examples = list(examples)
        self.cache = {}
        used = 0
        for index, example in enumerate(self.examples):
            try:
                enc = encoder.encode(example, with_answer=True)
            except ValueError as error:
                raise ValueError(f"training example {index} ({example.task}): {error}") from None
            size = sum(v.numel() * v.element_size() for v in enc.values() if isinstance(v, torch.Tensor))
            if used + size <= budget:
                self.cache[index] = enc
                used += size

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        if index in self.cache:
            return self.cache[index]
        return self.encoder.encode(self.examples[index], with_answer=True)


def _make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    # Without cpu=True accelerate ignores torchrun's environment on a CPU-only machine (no gloo group).
    return Accelerator(mixed_precision="bf16" if (cfg.bf16 and cuda) else "no", cpu=not cuda)


def _unwrap(accelerator, model):
    return accelerator.unwrap_model(model) if accelerator is not None else model


def _trained_tensors(accelerator, model, latent_ids) -> tuple:
    """(peft adapter state, every trainable tensor by name, latent rows) on CPU.

    Under FSDP the full state dict is gathered first (a collective: every process calls this)."""
    from peft import get_peft_model_state_dict

    from .latents import DELTA_PARAMETER, STATE_EMBEDDINGS, STATE_TOKEN_IDS, latent_state_dict

    unwrapped = _unwrap(accelerator, model)
    if not _is_fsdp(accelerator):
        rows = latent_state_dict(unwrapped, list(latent_ids)) if latent_ids else None
        return get_peft_model_state_dict(unwrapped), trainable_state_dict(unwrapped), rows
    full = accelerator.get_state_dict(model)
    names = [n for n, p in unwrapped.named_parameters() if p.requires_grad]
    trainable = {n: full[n].detach().cpu().clone() for n in names if n in full}
    rows = None
    if latent_ids:
        delta_key = next(k for k in full if k.endswith(DELTA_PARAMETER))
        weight = full[delta_key[: -len(DELTA_PARAMETER)] + "weight"]
        ids = torch.tensor(list(latent_ids))
        rows = {STATE_EMBEDDINGS: (weight[ids].float() + full[delta_key].float()).cpu(), STATE_TOKEN_IDS: ids}
    return get_peft_model_state_dict(unwrapped, state_dict=full), trainable, rows


def _save_training_checkpoint(accelerator, cfg: TrainConfig, model, optimizer, scheduler, state: ckpt.ResumeState,
                              latent_ids, stage: Stage, val_metric: Optional[float], select: bool) -> Path:
    """Write one checkpoint: every process stages its RNG state, the main process assembles the
    directory (atomically) and moves the pointers. ``output_dir`` must be shared by all processes."""
    from .latents import latent_token_strings

    output_dir = Path(cfg.output_dir)
    final_dir = output_dir / ckpt.CHECKPOINTS_DIR / ckpt.checkpoint_dir_name(state.global_step)
    staging = output_dir / ckpt.CHECKPOINTS_DIR / RNG_STAGING_DIR
    rng_name = ckpt.RNG_STATE_TEMPLATE.format(rank=accelerator.process_index)
    ckpt.atomic_torch_save(staging / rng_name, ckpt.get_rng_state())
    adapter, trainable, latent_rows = _trained_tensors(accelerator, model, latent_ids)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = _unwrap(accelerator, model)
        peft_config = unwrapped.peft_config["default"].to_dict()
        peft_config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in peft_config.items()}
        training_state = {
            "trainable": trainable,
            # FSDP shards the optimizer state; a rank-0 copy could not resume the run (see _load_resume).
            "optimizer": None if _is_fsdp(accelerator) else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "resume": state.to_dict(),
            "world_size": accelerator.num_processes,
        }
        info = {
            "global_step": state.global_step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
            "stage": stage.name, "rule": stage.rule, "val_accuracy": val_metric, "mode": cfg.mode,
        }
        files = {
            ckpt.ADAPTER_WEIGHTS: lambda p: ckpt.atomic_save_safetensors(p, adapter, {"format": "pt"}),
            ckpt.ADAPTER_CONFIG: json.dumps(peft_config, indent=2, sort_keys=True, default=str) + "\n",
            ckpt.RUN_CONFIG_JSON: json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n",
            ckpt.TRAINING_STATE: lambda p: ckpt.atomic_torch_save(p, training_state),
            ckpt.INFO: json.dumps(info, indent=2) + "\n",
        }
        if latent_rows is not None:
            files[ckpt.LATENT_WEIGHTS] = lambda p: ckpt.atomic_save_safetensors(p, latent_rows)
            files[ckpt.TOKENIZER_ADDITIONS] = json.dumps(
                {"tokens": latent_token_strings(len(latent_ids)), "ids": list(latent_ids)}, indent=2) + "\n"
        for rank in range(accelerator.num_processes):
            staged = staging / ckpt.RNG_STATE_TEMPLATE.format(rank=rank)
            files[staged.name] = lambda p, staged=staged: ckpt.atomic_write_bytes(p, staged.read_bytes())
        ckpt.write_checkpoint_dir(final_dir, files)
        shutil.rmtree(staging, ignore_errors=True)
        ckpt.write_pointer(output_dir, ckpt.LATEST_POINTER, final_dir, {"global_step": state.global_step})
        if select:
            ckpt.write_pointer(output_dir, ckpt.SELECTED_POINTER, final_dir,
                               {"global_step": state.global_step, "val_accuracy": val_metric})
        ckpt.prune_checkpoints(output_dir, cfg.keep_checkpoints,
                               protect=[ckpt.read_pointer(output_dir, ckpt.SELECTED_POINTER), final_dir])
    accelerator.wait_for_everyone()
    return final_dir


def _is_fsdp(accelerator) -> bool:
    return str(getattr(accelerator, "distributed_type", "")).endswith("FSDP")


# Run-config keys that must match for --resume to continue a run exactly.
RESUME_KEYS = ("model", "data", "val_data", "val_fraction", "mode", "latents", "stage_epochs", "sft_epochs", "lr",
               "weight_decay", "betas", "batch_size", "grad_accum", "warmup_ratio", "lora_r", "lora_alpha",
               "lora_dropout", "seed", "reset_optimizer_per_stage", "synthetic_train_size", "synthetic_image_size")


def _load_resume(accelerator, cfg: TrainConfig, model, optimizer, scheduler) -> Optional[ckpt.ResumeState]:
    latest = ckpt.read_pointer(cfg.output_dir, ckpt.LATEST_POINTER)
    if latest is None:
        if accelerator.is_main_process:
            print(f"--resume: no checkpoint in {cfg.output_dir}; starting a new run", flush=True)
        return None
    saved = json.loads((latest / ckpt.RUN_CONFIG_JSON).read_text())
    current = cfg.to_dict()
    diffs = [k for k in RESUME_KEYS if saved.get(k) != current.get(k)]
    if diffs:
        raise ValueError(
            f"--resume: the run in {cfg.output_dir} was made with different settings for {diffs} "
            f"(saved {[saved.get(k) for k in diffs]}, now {[current.get(k) for k in diffs]}); an exact resume needs the same ones"
        )
    training = ckpt.torch_load(latest / ckpt.TRAINING_STATE)
    if _is_fsdp(accelerator) or training["optimizer"] is None:
        raise ValueError(
            "--resume: exact resume (optimizer state included) is supported for single-process and DDP runs, not FSDP; "
            f"the checkpoints in {cfg.output_dir} still hold the adapter and latent rows for evaluation"
        )
    if training["world_size"] != accelerator.num_processes:
        raise ValueError(
            f"--resume: the checkpoint was written by {training['world_size']} processes, this run has "
            f"{accelerator.num_processes}; the data order per process would differ"
        )
    unwrapped = _unwrap(accelerator, model)
    params = dict(unwrapped.named_parameters())
    missing = sorted(set(training["trainable"]) - set(params))
    if missing:
        raise ValueError(f"--resume: the checkpoint holds trainable tensors this model lacks: {missing[:5]}")
    with torch.no_grad():
        # The exact tensors, not the exported adapter: bit-identical continuation.
        for name, value in training["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(training["optimizer"])
    scheduler.load_state_dict(training["scheduler"])
    ckpt.set_rng_state(ckpt.torch_load(latest / ckpt.RNG_STATE_TEMPLATE.format(rank=accelerator.process_index)))
    state = ckpt.ResumeState.from_dict(training["resume"])
    if accelerator.is_main_process:
        print(f"resuming from {latest} (step {state.global_step}, epoch {state.epoch}, batch {state.batch_in_epoch})", flush=True)
    return state


def _is_multitask(examples) -> bool:
    return len({e.task for e in examples}) > 1


def _validate(accelerator, cfg: TrainConfig, model, handle, encoder, val_examples) -> Optional[float]:
    """Validation accuracy (average over tasks) under ``cfg.eval_rule``; each process scores a
    shard and the records are gathered."""
    from accelerate.utils import gather_object

    from .evaluate import predict, result_from_records, rule_forced

    if not val_examples:
        return None
    examples = val_examples[: cfg.val_limit] if cfg.val_limit else val_examples
    shard = examples[accelerator.process_index::accelerator.num_processes]
    unwrapped = _unwrap(accelerator, model)
    with rule_forced(handle, cfg.eval_rule):
        records = predict(unwrapped, encoder, shard, method=cfg.eval_method, handle=handle,
                          batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens) if shard else []
    if accelerator.num_processes > 1:
        records = gather_object(records)
    return result_from_records(records).average


def _clear_optimizer_state(optimizer) -> None:
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.state.clear()


def train(cfg: TrainConfig, *, model=None, processor=None, train_examples=None, val_examples=None,
          step_callback: Optional[Callable[[StepInfo], None]] = None) -> TrainResult:
    """Run (or, with ``cfg.resume``, continue) a LIVR training run; returns the trained model.

    ``model``/``processor`` default to loading ``cfg.model``; ``train_examples``/``val_examples``
    default to ``prepare_data(cfg)``. ``step_callback`` is called after every optimizer step.
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    accelerator = _make_accelerator(cfg)
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    if model is None or processor is None:
        model, processor = load_model_and_processor(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if train_examples is None:
        train_examples, loaded_val = prepare_data(cfg)
        val_examples = loaded_val if val_examples is None else val_examples
    val_examples = list(val_examples or [])
    if not train_examples:
        raise ValueError("train_examples must hold at least one Example")

    model, handle, latent_ids = build_trainable_model(cfg, model, processor)
    encoder = make_encoder(cfg, model, processor, latent_ids)
    dataset = EncodedCache(encoder, train_examples)
    for index, example in enumerate(val_examples):
        # Fail now, not at the end of the first epoch, on a validation example that does not fit.
        try:
            encoder.encode(example, with_answer=False)
        except ValueError as error:
            raise ValueError(f"validation example {index} ({example.task}): {error}") from None
    if main:
        print(trainable_summary(model, latent_ids), flush=True)

    plan = stage_plan(cfg)
    world = accelerator.num_processes
    per_epoch = steps_per_epoch(len(dataset), cfg, world)
    schedule = StageSchedule([s.epochs * per_epoch for s in plan], cfg.warmup_ratio)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model, optimizer = accelerator.prepare(model, optimizer)

    output_dir = Path(cfg.output_dir)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_yaml(output_dir / ckpt.RUN_CONFIG_YAML, cfg.to_dict())
        ckpt.atomic_write_json(output_dir / ckpt.RUN_CONFIG_JSON, cfg.to_dict())
    state = (_load_resume(accelerator, cfg, model, optimizer, scheduler) if cfg.resume else None) or ckpt.ResumeState()
    single_task = not _is_multitask(train_examples)
    device = accelerator.device
    stop = False

    epoch_index = 0
    for stage_index, stage in enumerate(plan):
        stage_first_epoch = epoch_index
        for _ in range(stage.epochs):
            epoch = epoch_index
            epoch_index += 1
            if epoch < state.epoch or stop:
                continue
            handle.set_rule(stage.rule)
            if epoch == stage_first_epoch and stage_index > 0 and state.batch_in_epoch == 0 and cfg.reset_optimizer_per_stage:
                _clear_optimizer_state(optimizer)
            order = epoch_order(len(dataset), cfg.seed, epoch)
            my_batches = rank_batches(order, cfg.batch_size, world, accelerator.process_index)
            groups_of_epoch = accumulation_groups(my_batches, cfg.grad_accum)
            bar = tqdm(total=len(groups_of_epoch), initial=state.batch_in_epoch, disable=not (main and cfg.progress),
                       desc=f"{stage.name} ({stage.rule}) epoch {epoch - stage_first_epoch + 1}/{stage.epochs}", dynamic_ncols=True)
            model.train()
            for group_index in range(state.batch_in_epoch, len(groups_of_epoch)):
                group = groups_of_epoch[group_index]
                total_loss = 0.0
                for micro_index, indices in enumerate(group):
                    encoded = [dataset[i] for i in indices]
                    batch, labels, segment_ids = encoder.collate(encoded, padding_side="right")
                    batch = {k: v.to(device) for k, v in batch.items()}
                    last = micro_index == len(group) - 1
                    with (nullcontext() if last else accelerator.no_sync(model)):
                        with accelerator.autocast():
                            logits = model(**batch, segment_ids=segment_ids.to(device)).logits
                        loss = answer_nll(logits, labels.to(device)) / len(group)
                        accelerator.backward(loss)
                    total_loss += loss.item()
                if cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.global_step += 1
                state.epoch = epoch
                state.batch_in_epoch = group_index + 1
                bar.update(1)
                bar.set_postfix(loss=f"{total_loss:.4f}", lr=f"{lr:.2e}", stage=stage.name)
                if step_callback is not None:
                    step_callback(StepInfo(state.global_step, stage.name, handle.rule.name, epoch, total_loss, lr))
                at_end = group_index + 1 == len(groups_of_epoch)
                hit_max = cfg.max_steps is not None and state.global_step >= cfg.max_steps
                if not at_end and (hit_max or (cfg.save_steps and state.global_step % cfg.save_steps == 0)):
                    # Mid-epoch checkpoint: resumable; selected only by multi-task runs (they keep the last one),
                    # a single-task run selects by validation accuracy, which only epoch ends have.
                    _save_training_checkpoint(accelerator, cfg, model, optimizer, scheduler, state, latent_ids, stage, None,
                                              select=not single_task)
                if hit_max:
                    stop = True
                    break
            bar.close()
            if stop and state.batch_in_epoch < len(groups_of_epoch):
                break
            # End of epoch: the next one starts at its first batch.
            state.epoch, state.batch_in_epoch = epoch + 1, 0
            val = _validate(accelerator, cfg, model, handle, encoder, val_examples)
            handle.set_rule(stage.rule)
            state.history.append({"epoch": epoch, "stage": stage.name, "global_step": state.global_step, "val_accuracy": val})
            is_best = val is not None and (state.best_metric is None or val > state.best_metric)
            if is_best:
                state.best_metric, state.best_step = val, state.global_step
            select = (not single_task) or val is None or is_best
            if main:
                shown = "n/a" if val is None else f"{100 * val:.1f}%"
                print(f"{stage.name} epoch {epoch - stage_first_epoch + 1}/{stage.epochs}: validation accuracy {shown}", flush=True)
            _save_training_checkpoint(accelerator, cfg, model, optimizer, scheduler, state, latent_ids, stage, val, select=select)
            if cfg.max_steps is not None and state.global_step >= cfg.max_steps:
                stop = True
        if stop:
            break

    handle.set_rule(cfg.eval_rule)
    return TrainResult(
        model=_unwrap(accelerator, model), processor=processor, handle=handle, encoder=encoder,
        latent_token_ids=latent_ids, state=state, selected_checkpoint=ckpt.read_pointer(output_dir, ckpt.SELECTED_POINTER),
        train_examples=list(train_examples), val_examples=val_examples, accelerator=accelerator,
    )


@dataclass
class LoadedRun:
    """A trained run ready to evaluate: the patched peft model and how to encode prompts for it."""

    model: Any
    processor: Any
    handle: Any
    encoder: Any
    config: TrainConfig
    checkpoint_dir: Path
    latent_token_ids: tuple


def load_trained(path, *, model=None, processor=None) -> LoadedRun:
    """Rebuild a trained model from a checkpoint directory or a run's output directory (its
    selected checkpoint): the base model named in the run config (or the one given), the latent
    tokens, the LoRA adapter, and the attention patch under the run's evaluation rule."""
    from peft import PeftModel

    from .latents import add_latent_tokens, load_latent_state_dict
    from .patch import patch_attention

    checkpoint_dir = ckpt.resolve_checkpoint(path)
    cfg = TrainConfig.from_dict(json.loads((checkpoint_dir / ckpt.RUN_CONFIG_JSON).read_text()))
    if model is None or processor is None:
        model, processor = load_model_and_processor(cfg.model, trust_remote_code=cfg.trust_remote_code)
    latent_ids = ()
    if cfg.uses_new_latents:
        additions = json.loads((checkpoint_dir / ckpt.TOKENIZER_ADDITIONS).read_text())
        latent_ids = tuple(int(i) for i in add_latent_tokens(model, processor, k=cfg.latents, seed=cfg.seed))
        if list(latent_ids) != list(additions["ids"]):
            raise ValueError(
                f"the latent tokens got ids {list(latent_ids)} but the checkpoint was trained with {additions['ids']}: "
                f"is {cfg.model!r} the same base model and tokenizer?"
            )
    peft_model = PeftModel.from_pretrained(model, str(checkpoint_dir))
    if latent_ids:
        load_latent_state_dict(peft_model, ckpt.load_safetensors(checkpoint_dir / ckpt.LATENT_WEIGHTS), list(latent_ids))
    peft_model.eval()
    handle = patch_attention(peft_model, rule=cfg.eval_rule, latent_token_ids=latent_ids)
    encoder = make_encoder(cfg, peft_model, processor, latent_ids)
    return LoadedRun(peft_model, processor, handle, encoder, cfg, checkpoint_dir, latent_ids)
