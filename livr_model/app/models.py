"""Models of a run: loading the base, making it trainable for a mode, and reloading a trained run."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForImageTextToText, AutoProcessor

from livr_model.archs import get_arch
from livr_model.compat import enable_activation_checkpointing, install_remote_code_shims
from livr_model.latents import DELTA_PARAMETER, add_latent_tokens, load_latent_state_dict, restrict_embedding_grad
from livr_model.modes import TRAIN_LATENT_ROWS
from livr_model.patch import patch_attention
from livr_model.prompts import PromptEncoder, vocabulary_latent_ids

from .config import PIXEL_LIMITS, TrainConfig, stage_plan
from .files import load_safetensors
from .checkpoints import LATENT_WEIGHTS, RUN_CONFIG_JSON, TOKENIZER_ADDITIONS, require_complete, resolve_checkpoint
from .tiny import TinyQwen2_5_VLProcessor, load_tiny
from .trainer_runs import trainer_run_config

TINY_PROCESSOR_CLASS = TinyQwen2_5_VLProcessor.__name__


def load_model_and_processor(name: str, *, trust_remote_code: bool = False, dtype: Optional[torch.dtype] = None):
    """(model, processor) from a hub id or a local folder (including the demo's tiny base)."""
    path = Path(name).expanduser()
    if path.is_dir() and TINY_PROCESSOR_CLASS in _read_text(path / "processor_config.json"):
        return load_tiny(path)
    if _looks_like_path(name) and not path.is_dir():
        # The hub would answer with "Repo id must be in the form ...": say what is wrong instead.
        raise FileNotFoundError(f"model: {name!r} is a local path but not a folder (a hub id looks like 'org/name')")
    if dtype is None:
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if trust_remote_code:
        # Older remote code (LLaVA-OneVision-1.5) imports what transformers 5 removed (livr_model.compat).
        install_remote_code_shims()
    # A folder as expanded above ("~/models/x" from a YAML file is not a hub id either).
    source = str(path) if path.is_dir() else name
    try:
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        # transformers' messages span lines and never say which setting held the name. The plain
        # type: some hub error classes cannot be built from a message alone.
        where = "the local folder" if path.is_dir() else "not a local folder, and the hub"
        kind = ValueError if isinstance(error, ValueError) else OSError
        raise kind(f"model: {name!r}: {where} could not provide it: {' '.join(str(error).split())}") from error
    return model, processor


def _looks_like_path(name: str) -> bool:
    """A name no hub repository id can have: absolute, home- or dot-relative, or with 2+ slashes."""
    return name.startswith(("/", "~", "./", "../", ".\\")) or name.count("/") > 1 or Path(name).is_absolute()


def _read_text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def make_encoder(cfg: TrainConfig, model, processor, latent_token_ids: Sequence[int]) -> PromptEncoder:
    """The prompt encoder of ``cfg.mode`` for ``model``."""
    return PromptEncoder.for_model(cfg.mode, model, processor, latent_token_ids, cfg.latents, cfg.max_length,
                                   **{name: getattr(cfg, name) for name in PIXEL_LIMITS})


def mode_latent_ids(cfg: TrainConfig, model, processor) -> tuple:
    """The mode's latent token ids: K new tokens (added to tokenizer and model here), K existing
    vocabulary tokens, or none."""
    mode = cfg.mode_spec
    if mode.new_latents:
        return tuple(int(i) for i in add_latent_tokens(model, processor, k=cfg.latents, seed=cfg.seed))
    if mode.vocab_latents:
        return tuple(vocabulary_latent_ids(processor, cfg.latents))
    return ()


def id_marked_latents(cfg: TrainConfig, latent_ids) -> tuple:
    """The latent ids the attention patch marks LATENT wherever they occur: new tokens only
    (borrowed vocabulary tokens are LATENT by position, through the encoder's segment ids)."""
    return tuple(latent_ids) if cfg.mode_spec.new_latents else ()


def build_trainable_model(cfg: TrainConfig, model, processor):
    """Latent tokens (modes that use them), LoRA on the language model, everything else frozen,
    and the LIVR attention patch. Returns (peft model, handle, latent token ids).

    A mode that does not train LoRA (prompt tuning) still carries the adapters, frozen at their
    zero initialisation (B = 0, so they add exactly nothing): one checkpoint format for all modes."""
    arch, mode = get_arch(model), cfg.mode_spec
    latent_ids = mode_latent_ids(cfg, model, processor)
    for p in model.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=arch.lora_target_regex)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        peft_model = get_peft_model(model, lora)
    if not mode.trains_lora:
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.requires_grad_(False)
    if TRAIN_LATENT_ROWS in mode.trains:
        restrict_embedding_grad(peft_model, latent_ids)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(peft_model.get_base_model(), {"use_reentrant": False})
    handle = patch_attention(peft_model, rule=stage_plan(cfg)[0].rule, latent_token_ids=id_marked_latents(cfg, latent_ids))
    return peft_model, handle, latent_ids


def trainable_summary(model, latent_token_ids: Sequence[int]) -> str:
    """Trainable parameters by group: LoRA, latent embedding rows, anything else."""
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


def run_config_in(checkpoint_dir) -> TrainConfig:
    return TrainConfig.from_dict(json.loads((require_complete(checkpoint_dir) / RUN_CONFIG_JSON).read_text()))


def read_run_config(path) -> TrainConfig:
    """The TrainConfig of the checkpoint that ``path`` resolves to (saved by livr-train, or implied by
    a TRL / Trainer checkpoint's livr_run.json)."""
    checkpoint_dir = resolve_checkpoint(path)
    return trainer_run_config(checkpoint_dir) or run_config_in(checkpoint_dir)


def load_trained(path, *, model=None, processor=None, trust_remote_code: bool = False) -> LoadedRun:
    """Rebuild a trained model from a checkpoint directory or a run's output directory (its
    selected checkpoint): the base model named in the run config (or the one given), the latent
    tokens, the LoRA adapter, and the attention patch under the run's evaluation rule.

    Remote model code runs only with the caller's own ``trust_remote_code=True``: a checkpoint's
    run_config.json is a file anyone may have edited, so its setting is never taken as consent."""
    checkpoint_dir = resolve_checkpoint(path)
    cfg = trainer_run_config(checkpoint_dir) or run_config_in(checkpoint_dir)
    if model is None or processor is None:
        if cfg.trust_remote_code and not trust_remote_code:
            raise ValueError(
                f"the run in {str(checkpoint_dir)!r} was trained with trust_remote_code=True: its base model "
                f"{cfg.model!r} runs Python code from its repository. livr does not take that permission from "
                "the checkpoint's run_config.json (anyone could have written it); pass --trust-remote-code "
                "(trust_remote_code=True) if you trust that code"
            )
        model, processor = load_model_and_processor(cfg.model, trust_remote_code=trust_remote_code)
    latent_ids = mode_latent_ids(cfg, model, processor)
    if cfg.mode_spec.new_latents:
        additions = json.loads((checkpoint_dir / TOKENIZER_ADDITIONS).read_text())
        if list(latent_ids) != list(additions["ids"]):
            raise ValueError(
                f"the latent tokens got ids {list(latent_ids)} but the checkpoint was trained with {additions['ids']}: "
                f"is {cfg.model!r} the same base model and tokenizer?"
            )
    peft_model = PeftModel.from_pretrained(model, str(checkpoint_dir))
    if latent_ids:
        load_latent_state_dict(peft_model, load_safetensors(checkpoint_dir / LATENT_WEIGHTS), list(latent_ids))
    peft_model.eval()
    handle = patch_attention(peft_model, rule=cfg.eval_rule, latent_token_ids=id_marked_latents(cfg, latent_ids))
    encoder = make_encoder(cfg, peft_model, processor, latent_ids)
    return LoadedRun(peft_model, processor, handle, encoder, cfg, checkpoint_dir, latent_ids)
