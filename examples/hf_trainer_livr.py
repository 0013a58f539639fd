"""LIVR in a plain transformers Trainer script: peft first, then patch_attention (either order works).

CPU, offline, about a minute (the built-in tiny Qwen2.5-VL and synthetic counting; the tiny base is
random, so this shows the mechanics, not accuracy):

    python examples/hf_trainer_livr.py --output-dir runs/hf_tiny
    livr-eval --checkpoint runs/hf_tiny --data synthetic:counting --limit 16 --allow-overlap

GPU, the paper's settings (K=16, LoRA r=16 on the language model, lr 1e-4, batch 1 x 8, 4 + 6 epochs):

    python examples/hf_trainer_livr.py --model Qwen/Qwen2.5-VL-3B-Instruct --data my_task/train.jsonl --output-dir runs/hf_qwen

The training rows are livr's own JSONL rows ({"images", "question", "choices", "answer"}), which
LivrCollator reads as they are (image paths relative to --data's folder).
"""
import argparse
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments

from livr_model import LivrCollator, LivrStageCallback, add_latent_tokens, get_arch, patch_attention
from livr_model.app.data.synthetic import synthetic_training_examples
from livr_model.app.tiny import load_or_build_tiny

TINY = "tiny"
# (tiny, real model) defaults: latents, learning rate, batch, gradient accumulation, stage epochs, examples.
DEFAULTS = {TINY: dict(latents=4, lr=1e-3, batch=4, accum=1, stage_epochs=(1, 2), train_size=32),
            "hub": dict(latents=16, lr=1e-4, batch=1, accum=8, stage_epochs=(4, 6), train_size=1000)}


def load_model(name: str, output_dir: Path):
    """(model, processor, base path for livr-eval). The tiny base is saved first so livr-eval can reload it."""
    if name == TINY:
        base = output_dir / "base"
        model, processor = load_or_build_tiny(base)
        return model, processor, str(base)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return AutoModelForImageTextToText.from_pretrained(name, dtype=dtype), AutoProcessor.from_pretrained(name), name


def livr_rows(data: str, size: int):
    """(rows, image folder): the JSONL file's rows, or a synthetic task's examples as rows."""
    if data.endswith(".jsonl"):
        path = Path(data)
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:size], path.parent
    rows = [{"images": e.images, "question": e.question, "choices": e.choices, "answer": e.answer, "task": e.task}
            for e in synthetic_training_examples(data, size)]
    return rows, None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=TINY, help="'tiny' (offline) or a hub id / folder, e.g. Qwen/Qwen2.5-VL-3B-Instruct")
    p.add_argument("--data", default="counting", help="a livr JSONL file or a synthetic task name")
    p.add_argument("--output-dir", type=Path, default=Path("runs/hf_livr"))
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--stage-epochs", type=int, nargs=2, default=None, metavar=("E1", "E2"))
    args = p.parse_args(argv)
    d = DEFAULTS[TINY if args.model == TINY else "hub"]
    stage_epochs = tuple(args.stage_epochs or d["stage_epochs"])

    model, processor, base = load_model(args.model, args.output_dir)
    latent_ids = add_latent_tokens(model, processor, k=d["latents"], seed=0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, trainable_token_indices=latent_ids,
                                             target_modules=get_arch(model).lora_target_regex))
    handle = patch_attention(model, rule="bottleneck", latent_token_ids=latent_ids)   # the one LIVR line

    rows, image_root = livr_rows(args.data, args.train_size or d["train_size"])
    training_args = TrainingArguments(
        output_dir=str(args.output_dir), num_train_epochs=sum(stage_epochs), learning_rate=d["lr"],
        per_device_train_batch_size=d["batch"], gradient_accumulation_steps=d["accum"], warmup_steps=0.05,
        weight_decay=0.01, logging_steps=5, save_strategy="epoch", save_total_limit=2, report_to=[], seed=42,
        remove_unused_columns=False,   # the collator reads the rows' own columns
        # The model is loaded in its training dtype (fp32 on CPU), so no autocast is needed.
        bf16=False, use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=rows,
        data_collator=LivrCollator(processor, latent_token_ids=latent_ids, mode="livr", image_root=image_root),
        callbacks=[LivrStageCallback(handle, stage_epochs=stage_epochs, base_model=base)],
    )
    trainer.train()
    # A Trainer run records no training fingerprints, so livr-eval needs --allow-overlap to score it.
    print(f"done; score it with: livr-eval --checkpoint {args.output_dir} --data <held-out data> --allow-overlap", flush=True)
    return trainer


if __name__ == "__main__":
    main()
