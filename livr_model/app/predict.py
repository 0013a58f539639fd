"""Model predictions for evaluation: greedy replies or option likelihoods, under a chosen rule.

* ``generate``: greedy generation, then the choice letter is read from the reply (``scoring``).
* ``likelihood``: every option is scored by the summed log-probability of its answer text after
  the prompt, and the best one is the prediction (open-ended items fall back to generation).
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager, nullcontext
from typing import Sequence

import torch

from livr_model.archs import tokenizer_of
from livr_model.prompts import LETTERS, PromptEncoder
from livr_model.segment_ids import IGNORE_INDEX

from .scoring import answer_letter, score_reply

EVAL_METHODS = ("generate", "likelihood")


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def chunks(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


@contextmanager
def eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def rule_forced(handle, rule):
    """Temporarily run ``handle`` under ``rule`` (None: leave it as it is)."""
    if handle is None or rule is None:
        yield
        return
    previous = handle.rule
    handle.set_rule(rule)
    try:
        yield
    finally:
        handle.set_rule(previous)


@torch.no_grad()
def generate_replies(model, encoder: PromptEncoder, examples: Sequence, *, handle=None, batch_size: int = 8,
                     max_new_tokens: int = 16, drop_latents: bool = False) -> list:
    """Greedy replies (decoded text) for ``examples``; the latent tokens are never generated."""
    tokenizer = tokenizer_of(encoder.processor)
    device = device_of(model)
    replies = []
    # New latent tokens are never words; mask-only's borrowed tokens stay ordinary vocabulary.
    suppress = list(encoder.latent_token_ids) or None
    with eval_mode(model):
        for chunk in chunks(list(examples), batch_size):
            batch, _, segment_ids = encoder.batch(chunk, with_answer=False, padding_side="left", device=device,
                                                  drop_latents=drop_latents)
            prompt_len = batch["input_ids"].shape[1]
            kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=encoder.pad_token_id, suppress_tokens=suppress)
            with (handle.use_segment_ids(segment_ids) if handle is not None else nullcontext()):
                out = model.generate(**batch, **kwargs)
            replies.extend(tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True))
    return replies


@torch.no_grad()
def answer_logprobs(model, encoder: PromptEncoder, examples: Sequence, *, batch_size: int = 8, drop_latents: bool = False) -> list:
    """Summed log-probability of each example's answer text (and end of turn) after its prompt."""
    device = device_of(model)
    scores = []
    with eval_mode(model):
        for chunk in chunks(list(examples), batch_size):
            batch, labels, segment_ids = encoder.batch(chunk, with_answer=True, padding_side="right", device=device,
                                                       drop_latents=drop_latents)
            logits = model(**batch, segment_ids=segment_ids).logits.float()
            labels = labels[:, 1:]
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            mask = labels != IGNORE_INDEX
            picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            scores.extend((picked * mask).sum(dim=1).tolist())
    return scores


def predict(model, encoder: PromptEncoder, examples: Sequence, *, method: str = "generate", handle=None,
            batch_size: int = 8, max_new_tokens: int = 16, drop_latents: bool = False) -> list:
    """One record per example: task, gold answer, prediction, correct, and the reply (generation)."""
    if method not in EVAL_METHODS:
        raise ValueError(f"method must be 'generate' or 'likelihood'; got {method!r}")
    examples = list(examples)
    records = [None] * len(examples)
    to_generate = [i for i, ex in enumerate(examples) if method == "generate" or not ex.choices]
    if method == "likelihood":
        options, owners = [], []
        for i, ex in enumerate(examples):
            for letter in LETTERS[:len(ex.choices)]:
                options.append(dataclasses.replace(ex, answer=letter))
                owners.append(i)
        scores = answer_logprobs(model, encoder, options, batch_size=batch_size, drop_latents=drop_latents)
        best = {}
        for i, option, score in zip(owners, options, scores):
            if i not in best or score > best[i][1]:
                best[i] = (option.answer, score)
        for i, (letter, _) in best.items():
            ex = examples[i]
            records[i] = {"task": ex.task, "answer": ex.answer, "prediction": letter, "correct": letter == answer_letter(ex.answer)}
    if to_generate:
        replies = generate_replies(model, encoder, [examples[i] for i in to_generate], handle=handle, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, drop_latents=drop_latents)
        for i, reply in zip(to_generate, replies):
            ex = examples[i]
            pred, correct = score_reply(reply, ex.answer, len(ex.choices))
            records[i] = {"task": ex.task, "answer": ex.answer, "prediction": pred, "correct": bool(correct), "reply": reply}
    return records
