"""Command lines: ``livr-train`` and ``livr-eval``.

``livr-train`` takes flags and/or ``--config run.yaml``; the YAML's keys are TrainConfig field
names (dashes or underscores) and any flag given on the command line overrides the file.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Optional, Sequence

from livr_kernels import RULES
from livr_model.modes import MODES

from .cli_errors import add_debug_flag, run_command, user_input
from .config import EVAL_METHODS, TrainConfig, apply_multi_task_preset, load_yaml
from .data import load_examples, prepare_data
from .data.records import check_overlap, find_run_dir
from .demo import DEMO_SIZES, DEMO_STAGE2_FRACTION, demo_config, run_demo
from .models import load_trained, read_run_config
from .probes import evaluate_model
from .train import train

DEFAULTS = TrainConfig()


def _bool_flag(parser, name: str, help_text: str) -> None:
    parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)


def _value_flag(parser, name: str, value_type, help_text: str, **kwargs) -> None:
    parser.add_argument(f"--{name}", type=value_type, default=argparse.SUPPRESS, help=help_text, **kwargs)


NONE_WORDS = ("none", "null", "")


def _optional(convert, expected: str):
    """An argparse type: ``convert(text)``, or None for a NONE_WORDS entry; else an error naming ``expected``."""
    def parse(text: str):
        if text.lower() in NONE_WORDS:
            return None
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected} or 'none'; got {text!r}") from None

    return parse


_optional_int = _optional(int, "an integer")
_optional_float = _optional(float, "a number")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {text!r}")
    return value


def _nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a non-empty path; got ''")
    return text


def build_train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="livr-train", allow_abbrev=False,
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
    one_stage = [name for name, mode in MODES.items() if len(mode.stage_rules) == 1]
    _value_flag(p, "sft-epochs", _optional_int, f"epochs of the one-stage modes ({', '.join(one_stage)}) (default: E1 + E2)")
    _value_flag(p, "output-dir", str, f"where checkpoints, run config and metrics go (default {d.output_dir})")
    _value_flag(p, "lr", float, f"AdamW learning rate (default {d.lr})")
    _value_flag(p, "stage2-lr", _optional_float, "peak learning rate of stage 2, the standard-mask stage (default: --lr)")
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
    _bool_flag(p, "overwrite", "start afresh in an --output-dir that holds another run (deletes its checkpoints)")
    _bool_flag(p, "allow-outside-paths", "let JSONL image paths be absolute or climb out of the data folder with '..'")
    _bool_flag(p, "packing", "pack each micro-batch's examples into rows of at most --max-length tokens (same losses, less padding)")
    _bool_flag(p, "gradient-checkpointing", "recompute activations in backward to save memory")
    _bool_flag(p, "bf16", "bf16 autocast on CUDA (ignored on CPU)")
    _bool_flag(p, "reset-optimizer-per-stage", "fresh AdamW moments at the start of stage 2")
    _bool_flag(p, "trust-remote-code", "allow remote model code (e.g. LLaVA-OneVision-1.5)")
    _bool_flag(p, "progress", "progress bars")
    add_paper_flags(p)
    add_debug_flag(p)
    return p


def add_paper_flags(p: argparse.ArgumentParser) -> None:
    """Data splits, the multi-task preset and image resolution (the paper's experiments)."""
    _value_flag(p, "blink-split", str, "JSON split file of BLINK item ids (train/eval, disjoint); needed to train on blink:")
    _bool_flag(p, "multi-task", "the paper's multi-task preset: stage epochs 2 3 (unless given) and the last checkpoint evaluated")
    _value_flag(p, "min-pixels", _optional_int, "processor: at least this many pixels per image")
    _value_flag(p, "max-pixels", _optional_int, "processor: at most this many pixels per image")
    _value_flag(p, "multi-image-max-pixels", _optional_int, "processor: at most this many pixels per image when a question has 2+ images (default: --max-pixels)")


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
    raw = load_yaml(path.read_text(), f"--config {path}") or {}
    if not isinstance(raw, dict):
        raise ValueError(f"--config: {str(path)!r} must hold a mapping of TrainConfig keys, got {type(raw).__name__}")
    return _normalize_keys(raw, f"--config {path}")


def resolve_train_config(argv: Optional[Sequence[str]] = None, base: Optional[dict] = None) -> tuple:
    """(TrainConfig, parsed namespace): ``base`` (dataclass defaults when None; the demo's settings
    with --demo), then the YAML file, then the flags given on the command line."""
    args = build_train_parser().parse_args(argv)
    return config_from_args(args, base), args


def config_from_args(args: argparse.Namespace, base: Optional[dict] = None) -> TrainConfig:
    merged = dict(base or {})
    if args.demo and base is None:
        merged.update(demo_config(DEMO_SIZES[args.demo_size]))
    file_settings = load_config_file(args.config) if args.config is not None else {}
    merged.update(file_settings)
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "demo", "demo_size", "debug")}
    flag_settings = _normalize_keys(flags, "flags")
    merged.update(flag_settings)
    given = {**file_settings, **flag_settings}
    if args.demo and base is None and "lr" in given and "stage2_lr" not in given:
        # The demo's stage 2 keeps its fraction of whatever stage 1's rate is.
        merged["stage2_lr"] = merged["lr"] * DEMO_STAGE2_FRACTION
    return TrainConfig(**apply_multi_task_preset(merged, [file_settings, flag_settings]))


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command(build_train_parser(), _train, argv)


def _train(args: argparse.Namespace) -> int:
    with user_input():
        cfg = config_from_args(args)
        if not args.demo and not cfg.data:
            raise ValueError("--data is required (or use --demo); see --help")
    if args.demo:
        metrics = run_demo(cfg, DEMO_SIZES[args.demo_size])
        # A demo that did not learn is a failure, not a result.
        return 0 if metrics["verdict"]["learned"] else 1
    result = train(cfg)
    # Every rank leaves together and the process group goes down before exit (a gloo rank exiting
    # while another still writes can abort at exit after a successful run).
    result.accelerator.wait_for_everyone()
    result.accelerator.end_training()
    return 0


def build_eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="livr-eval", allow_abbrev=False,
        description="Evaluate a livr-train run: accuracy per task and averaged, plus the LIVR probes.",
    )
    p.add_argument("--checkpoint", required=True, help="a run's --output-dir (its selected checkpoint; for a TRL / Trainer run "
                   "with LivrStageCallback, its newest checkpoint-N) or one checkpoint directory")
    p.add_argument("--data", default=None, help="evaluation data: JSONL path, blink:<Subtask> or synthetic:<task>[,<task>] (default: the run's validation data)")
    p.add_argument("--method", choices=EVAL_METHODS, default="generate", help="generate (letter extraction) or likelihood (option scoring)")
    p.add_argument("--rule", default=None, choices=tuple(RULES), help="attention rule for the main accuracy (default: the run's eval rule, standard)")
    p.add_argument("--output-dir", type=_nonempty, default=None, help="where metrics.json and the heatmap go (default: <checkpoint>/eval)")
    p.add_argument("--limit", type=_positive_int, default=None, help="evaluate at most this many examples per task")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="examples per batch")
    p.add_argument("--max-new-tokens", type=_positive_int, default=None, help="generation length (default: the run's)")
    p.add_argument("--probes", action=argparse.BooleanOptionalAction, default=True, help="run the probes (default on)")
    p.add_argument("--allow-overlap", action="store_true",
                   help="evaluate items the run was trained on (warns and reports how many) instead of refusing")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the base model's remote code; needed for runs trained with it (never taken from the checkpoint)")
    p.add_argument("--allow-outside-paths", action="store_true",
                   help="let JSONL image paths be absolute or climb out of the data folder with '..'")
    add_debug_flag(p)
    return p


def eval_main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command(build_eval_parser(), _evaluate, argv)


def _evaluate(args: argparse.Namespace) -> int:
    with user_input():
        # The data first: a missing file is reported before the base model is loaded.
        cfg = dataclasses.replace(read_run_config(args.checkpoint), allow_outside_paths=args.allow_outside_paths)
        if args.data:
            examples = load_examples(args.data, cfg, split="val")
        elif not cfg.data:
            raise ValueError("--data is required for a run trained with TRL / Trainer (its checkpoint names no data)")
        else:
            # The validation items the run recorded (same held-out indices, checked against their fingerprints).
            examples = prepare_data(cfg, record_dir=find_run_dir(args.checkpoint))[1]
        if args.limit is not None:
            seen, limited = {}, []
            for example in examples:
                seen[example.task] = seen.get(example.task, 0) + 1
                if seen[example.task] <= args.limit:
                    limited.append(example)
            examples = limited
        # Before the model: a refused overlap should not wait for a (possibly multi-GB) load.
        overlap = check_overlap(args.checkpoint, examples, allow=args.allow_overlap)
        run = load_trained(args.checkpoint, trust_remote_code=args.trust_remote_code)
        # A checkpoint that lives only as the copy a killed save left is evaluated into that copy:
        # <checkpoint>/eval would make the missing name again, a folder every loader then takes for it.
        given = Path(args.checkpoint)
        default_dir = (given if given.exists() else Path(run.checkpoint_dir)) / "eval"
        output_dir = Path(args.output_dir) if args.output_dir is not None else default_dir
        # Now, not after the evaluation: an --output-dir that is a file or not writable.
        output_dir.mkdir(parents=True, exist_ok=True)
    evaluate_model(
        run.model, run.handle, run.encoder, examples, method=args.method, rule=args.rule or cfg.eval_rule,
        batch_size=args.batch_size,
        max_new_tokens=cfg.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens, probes=args.probes,
        output_dir=output_dir, extra={"checkpoint": str(run.checkpoint_dir), "training_overlap": overlap},
    )
    print(f"wrote {output_dir / 'metrics.json'}", flush=True)
    return 0


if __name__ == "__main__":
    # `python -m livr_model.app.cli ...` is livr-train, for launchers that want a module
    # (`accelerate launch -m livr_model.app.cli`, `torchrun -m livr_model.app.cli`).
    raise SystemExit(train_main())
