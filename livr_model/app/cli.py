"""Command lines: ``livr-train`` and ``livr-eval``.

``livr-train`` takes flags and/or ``--config run.yaml``; the YAML's keys are TrainConfig field
names (dashes or underscores) and any flag given on the command line overrides the file.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import yaml

from livr_model.modes import MODES

from .config import EVAL_METHODS, TrainConfig
from .data import load_examples, prepare_data
from .demo import DEMO_SIZES, demo_config, run_demo
from .models import load_trained
from .probes import evaluate_model
from .train import train

DEFAULTS = TrainConfig()


def _bool_flag(parser, name: str, help_text: str) -> None:
    parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)


def _value_flag(parser, name: str, value_type, help_text: str, **kwargs) -> None:
    parser.add_argument(f"--{name}", type=value_type, default=argparse.SUPPRESS, help=help_text, **kwargs)


def _optional_int(text: str) -> Optional[int]:
    return None if text.lower() in ("none", "null", "") else int(text)


def build_train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="livr-train",
        description="Fine-tune a vision-language model with LIVR (latent tokens + two-stage visual bottleneck).",
    )
    p.add_argument("--config", type=Path, default=None, help="YAML file of TrainConfig keys; flags override it")
    p.add_argument("--demo", action="store_true", help="offline demo: tiny Qwen2.5-VL, synthetic tasks, both stages, evaluation and probes")
    p.add_argument("--demo-size", choices=("small", "full"), default="full", help="demo size: 'small' is the quick one the tests run")
    d = DEFAULTS
    _value_flag(p, "model", str, f"hub id or local directory of the base model (default {d.model})")
    _value_flag(p, "data", str, "training data: a JSONL path, blink:<Subtask>, or synthetic:<task>[,<task>...]")
    _value_flag(p, "val-data", str, "validation data in the same forms (default: hold out --val-fraction of --data)")
    _value_flag(p, "val-fraction", float, f"held-out fraction when no --val-data (default {d.val_fraction})")
    _value_flag(p, "mode", str, f"one of {', '.join(MODES)} (default {d.mode})", choices=tuple(MODES))
    _value_flag(p, "latents", int, f"number K of latent tokens (default {d.latents})")
    _value_flag(p, "stage-epochs", int, f"epochs of stage 1 (bottleneck) and stage 2 (standard) (default {d.stage_epochs[0]} {d.stage_epochs[1]})", nargs=2, metavar=("E1", "E2"))
    _value_flag(p, "sft-epochs", _optional_int, "epochs of the one-stage modes sft and image-twice (default: E1 + E2)")
    _value_flag(p, "output-dir", str, f"where checkpoints, run config and metrics go (default {d.output_dir})")
    _value_flag(p, "lr", float, f"AdamW learning rate (default {d.lr})")
    _value_flag(p, "weight-decay", float, f"AdamW weight decay (default {d.weight_decay})")
    _value_flag(p, "warmup-ratio", float, f"linear warmup fraction of each stage (default {d.warmup_ratio})")
    _value_flag(p, "batch-size", int, f"examples per process per micro-batch (default {d.batch_size})")
    _value_flag(p, "grad-accum", int, f"micro-batches per optimizer step (default {d.grad_accum})")
    _value_flag(p, "seed", int, f"seed of initialisation and data order (default {d.seed})")
    _value_flag(p, "lora-r", int, f"LoRA rank (default {d.lora_r})")
    _value_flag(p, "lora-alpha", int, f"LoRA alpha (default {d.lora_alpha})")
    _value_flag(p, "lora-dropout", float, f"LoRA dropout (default {d.lora_dropout})")
    _value_flag(p, "max-length", _optional_int, "reject examples longer than this many tokens (default: no limit)")
    _value_flag(p, "eval-method", str, f"validation accuracy by {' or '.join(EVAL_METHODS)} (default {d.eval_method})", choices=EVAL_METHODS)
    _value_flag(p, "eval-batch-size", int, f"examples per evaluation batch (default {d.eval_batch_size})")
    _value_flag(p, "max-new-tokens", int, f"generation length at evaluation (default {d.max_new_tokens})")
    _value_flag(p, "val-limit", _optional_int, "evaluate at most this many validation examples per epoch")
    _value_flag(p, "save-steps", _optional_int, "also checkpoint every N optimizer steps (always at each epoch end)")
    _value_flag(p, "keep-checkpoints", int, f"newest checkpoints kept besides the selected one (default {d.keep_checkpoints})")
    _value_flag(p, "max-steps", _optional_int, "stop after this many optimizer steps (a checkpoint is written there)")
    _value_flag(p, "synthetic-train-size", int, f"training examples per synthetic task (default {d.synthetic_train_size})")
    _value_flag(p, "synthetic-val-size", int, f"validation examples per synthetic task (default {d.synthetic_val_size})")
    _value_flag(p, "synthetic-image-size", int, f"side of synthetic images in pixels (default {d.synthetic_image_size})")
    _bool_flag(p, "resume", "continue the run in --output-dir from its latest checkpoint")
    _bool_flag(p, "gradient-checkpointing", "recompute activations in backward to save memory")
    _bool_flag(p, "bf16", "bf16 autocast on CUDA (ignored on CPU)")
    _bool_flag(p, "reset-optimizer-per-stage", "fresh AdamW moments at the start of stage 2")
    _bool_flag(p, "trust-remote-code", "allow remote model code (e.g. LLaVA-OneVision-1.5)")
    _bool_flag(p, "progress", "progress bars")
    return p


def _normalize_keys(raw: dict, source: str) -> dict:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise ValueError(f"{source}: unknown key {key!r}; known keys are {sorted(names)}")
        out[name] = value
    return out


def load_config_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config: {str(path)!r} is not a file")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"--config: {str(path)!r} must hold a mapping of TrainConfig keys, got {type(raw).__name__}")
    return _normalize_keys(raw, f"--config {path}")


def resolve_train_config(argv: Optional[Sequence[str]] = None, base: Optional[dict] = None) -> tuple:
    """(TrainConfig, parsed namespace): ``base`` (dataclass defaults when None; the demo's settings
    with --demo), then the YAML file, then the flags given on the command line."""
    args = build_train_parser().parse_args(argv)
    merged = dict(base or {})
    if args.demo and base is None:
        merged.update(demo_config(DEMO_SIZES[args.demo_size]))
    if args.config is not None:
        merged.update(load_config_file(args.config))
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "demo", "demo_size")}
    merged.update(_normalize_keys(flags, "flags"))
    return TrainConfig(**merged), args


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    cfg, args = resolve_train_config(argv)
    if args.demo:
        metrics = run_demo(cfg, DEMO_SIZES[args.demo_size])
        # A demo that did not learn is a failure, not a result.
        return 0 if metrics["verdict"]["learned"] else 1
    if not cfg.data:
        raise SystemExit("livr-train: --data is required (or use --demo); see --help")
    train(cfg)
    return 0


def build_eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="livr-eval",
        description="Evaluate a livr-train run: accuracy per task and averaged, plus the LIVR probes.",
    )
    p.add_argument("--checkpoint", required=True, help="a run's --output-dir (its selected checkpoint) or one checkpoint directory")
    p.add_argument("--data", default=None, help="evaluation data: JSONL path, blink:<Subtask> or synthetic:<task>[,<task>] (default: the run's validation data)")
    p.add_argument("--method", choices=EVAL_METHODS, default="generate", help="generate (letter extraction) or likelihood (option scoring)")
    p.add_argument("--rule", default=None, help="attention rule for the main accuracy (default: the run's eval rule, standard)")
    p.add_argument("--output-dir", default=None, help="where metrics.json and the heatmap go (default: <checkpoint>/eval)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many examples per task")
    p.add_argument("--batch-size", type=int, default=8, help="examples per batch")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation length (default: the run's)")
    p.add_argument("--probes", action=argparse.BooleanOptionalAction, default=True, help="run the probes (default on)")
    return p


def eval_main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_eval_parser().parse_args(argv)
    run = load_trained(args.checkpoint)
    cfg = run.config
    if args.data:
        examples = load_examples(args.data, cfg, split="val")
    else:
        examples = prepare_data(cfg)[1]
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1; got {args.limit}")
        seen, limited = {}, []
        for example in examples:
            seen[example.task] = seen.get(example.task, 0) + 1
            if seen[example.task] <= args.limit:
                limited.append(example)
        examples = limited
    output_dir = Path(args.output_dir) if args.output_dir else Path(args.checkpoint) / "eval"
    evaluate_model(
        run.model, run.handle, run.encoder, examples, method=args.method, rule=args.rule or cfg.eval_rule,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens or cfg.max_new_tokens, probes=args.probes,
        output_dir=output_dir, extra={"checkpoint": str(run.checkpoint_dir)},
    )
    print(f"wrote {output_dir / 'metrics.json'}", flush=True)
    return 0


if __name__ == "__main__":
    # `python -m livr_model.app.cli ...` is livr-train, for launchers that want a module
    # (`accelerate launch -m livr_model.app.cli`, `torchrun -m livr_model.app.cli`).
    raise SystemExit(train_main())
