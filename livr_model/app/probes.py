"""The LIVR paper's probes (section 5) and ``evaluate_model``, which runs accuracy and the probes.

The probes: the mean attention mass that answer tokens put on the latent tokens; accuracy with
the latents removed from the prompt; accuracy with the bottleneck mask forced at test time; and a
heatmap of latent-to-image attention drawn over the input image. Which of them apply is the
mode's choice (``livr_model.modes``).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from livr_kernels import Segment
from livr_model.modes import PROBE_ANSWER_ATTENTION, PROBE_BOTTLENECK_FORCED, PROBE_HEATMAP, PROBE_LATENTS_REMOVED, get_mode
from livr_model.prompts import PromptEncoder

from .figures import draw_heatmap
from .files import atomic_write_json
from .predict import chunks, device_of, eval_mode, predict, rule_forced
from .scoring import below_chance_note, chance_accuracy, metrics_table, result_from_records

@torch.no_grad()
def answer_latent_attention(model, handle, encoder: PromptEncoder, examples: Sequence, *, batch_size: int = 4) -> Optional[float]:
    """Mean attention mass that answer tokens put on the latent tokens.

    For each example (gold answer appended), each text layer and head, each answer query's
    attention probabilities summed over the LATENT keys; averaged over answer queries, heads,
    layers and examples (the paper reports 0.076 for LIVR vs 0.028 for latents without the mask).
    None when the prompts hold no latent slots.
    """
    device = device_of(model)
    per_example = []
    with eval_mode(model):
        for chunk in chunks(list(examples), batch_size):
            batch, _, segment_ids = encoder.batch(chunk, with_answer=True, padding_side="right", device=device)
            with handle.capture_attention() as capture:
                model(**batch, segment_ids=segment_ids)
            if not capture.weights:
                raise ValueError("capture_attention recorded no layers: is the model patched with patch_attention?")
            kinds = capture.segment_ids.to(device)
            # (B, Nq, Nk) averaged over layers and heads.
            weights = torch.stack([w.float().mean(dim=1) for w in capture.weights]).mean(dim=0)
            for row in range(weights.shape[0]):
                queries = kinds[row] == int(Segment.ANSWER)
                keys = kinds[row] == int(Segment.LATENT)
                if not keys.any():
                    return None
                mass = weights[row][queries][:, keys].sum(dim=-1)
                per_example.append(mass.mean().item())
    return sum(per_example) / len(per_example) if per_example else None


@torch.no_grad()
def latent_image_attention(model, handle, encoder: PromptEncoder, example, *, per_latent: bool = False) -> Optional[list]:
    """Per image of ``example``, a 2-D map (merged patch grid) of the attention the latent tokens pay
    to its image tokens, averaged over layers, heads and latents (``per_latent``: a
    (latents, rows, cols) map, not averaged over latents). None when there are no latents or the
    model gives no ``image_grid_thw`` (non-Qwen layouts)."""
    device = device_of(model)
    batch, _, segment_ids = encoder.batch([example], with_answer=False, padding_side="right", device=device)
    grid_thw = batch.get("image_grid_thw")
    if grid_thw is None:
        return None
    with eval_mode(model), handle.capture_attention() as capture:
        model(**batch, segment_ids=segment_ids)
    kinds = capture.segment_ids[0].cpu()
    queries = kinds == int(Segment.LATENT)
    keys = kinds == int(Segment.IMAGE)
    if not queries.any() or not keys.any():
        return None
    weights = torch.stack([w[0].float().mean(dim=0).cpu() for w in capture.weights]).mean(dim=0)
    # [latents, image tokens]
    per_token = weights[queries][:, keys]
    if not per_latent:
        per_token = per_token.mean(dim=0, keepdim=True)
    merge = _merge_size(model, encoder.processor)
    maps, start = [], 0
    for t, h, w in grid_thw.tolist():
        rows, cols = h // merge, w // merge
        count = t * rows * cols
        grid = per_token[:, start:start + count].reshape(-1, t, rows, cols).mean(dim=1)
        maps.append(grid if per_latent else grid[0])
        start += count
    if start != per_token.shape[1]:
        raise ValueError(f"image_grid_thw accounts for {start} image tokens but the prompt holds {per_token.shape[1]}")
    return maps


def _layer_count(model) -> int:
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", config)
    return int(getattr(text, "num_hidden_layers", 0))


def _merge_size(model, processor) -> int:
    config = getattr(model, "config", None)
    vision = getattr(config, "vision_config", None)
    merge = getattr(vision, "spatial_merge_size", None) or getattr(getattr(processor, "image_processor", None), "merge_size", None)
    if not merge:
        raise ValueError("cannot map image tokens to patches: neither the vision config nor the image processor names a merge size")
    return int(merge)


METRICS_FILE = "metrics.json"
HEATMAP_FILE = "latent_attention.png"
DEFAULT_PROBE_LIMIT = 32


def evaluate_model(model, handle, encoder: PromptEncoder, examples: Sequence, *, method: str = "generate",
                   rule: str = "standard", batch_size: int = 8, max_new_tokens: int = 16, probes: bool = True,
                   probe_limit: int = DEFAULT_PROBE_LIMIT, output_dir=None, extra: Optional[dict] = None,
                   verbose: bool = True) -> dict:
    """Accuracy per task and averaged, plus (``probes``) the paper's probes; writes
    ``metrics.json`` (and the heatmap PNG) into ``output_dir`` when given, prints a table.

    ``rule`` is the attention rule for the main accuracy (``standard``: the deployed model).
    """
    examples = list(examples)
    if not examples:
        raise ValueError("examples must hold at least one Example to evaluate")
    options = dict(method=method, handle=handle, batch_size=batch_size, max_new_tokens=max_new_tokens)
    with rule_forced(handle, rule):
        main = result_from_records(predict(model, encoder, examples, **options))
    metrics = {
        "method": method,
        "rule": rule,
        "mode": encoder.mode,
        "num_examples": len(examples),
        "accuracy": main.to_dict(),
        "chance": chance_accuracy(examples),
        "majority": majority_rate(examples),
        "options": {ex.task: len(ex.choices) for ex in examples},
        "predictions": main.predictions,
    }
    applies = get_mode(encoder.mode).probes
    if probes:
        # Every probe has a key; the ones the mode does not apply are None.
        probe = {name: None for name in (PROBE_ANSWER_ATTENTION, PROBE_LATENTS_REMOVED, PROBE_BOTTLENECK_FORCED, PROBE_HEATMAP)}
        with rule_forced(handle, rule):
            if PROBE_ANSWER_ATTENTION in applies:
                probe[PROBE_ANSWER_ATTENTION] = answer_latent_attention(model, handle, encoder, examples[:probe_limit])
            if PROBE_LATENTS_REMOVED in applies:
                probe[PROBE_LATENTS_REMOVED] = result_from_records(
                    predict(model, encoder, examples, drop_latents=True, **options)).to_dict()
        if PROBE_BOTTLENECK_FORCED in applies:
            with rule_forced(handle, "bottleneck"):
                probe[PROBE_BOTTLENECK_FORCED] = result_from_records(predict(model, encoder, examples, **options)).to_dict()
        if PROBE_HEATMAP in applies and output_dir is not None:
            with rule_forced(handle, rule):
                maps = latent_image_attention(model, handle, encoder, examples[0], per_latent=True)
            if maps is not None:
                shown = encoder.prepare(examples[0]).images
                first = examples[0]
                title = (f"Latent->image attention (mean over {_layer_count(model)} text layers and heads), rule {rule}, "
                         f"mode {encoder.mode}; validation example 1 ({first.task}): {first.question!r}, gold answer "
                         f"{first.answer}, predicted {main.predictions[0]['prediction']}")
                draw_heatmap(shown, maps, Path(output_dir) / HEATMAP_FILE, title=title)
                probe[PROBE_HEATMAP] = HEATMAP_FILE
        metrics["probes"] = probe
    if extra:
        metrics.update(extra)
    if output_dir is not None:
        atomic_write_json(Path(output_dir) / METRICS_FILE, metrics)
    if verbose:
        print(metrics_table(metrics), flush=True)
    return metrics


# "Learned" means beating the stronger of chance and always giving the most common answer by this
# many accuracy points, with at least this many distinct answers (fewer when there are fewer options).
LEARNED_MARGIN = 0.10
MIN_DISTINCT_ANSWERS = 3
# The paper's signature: accuracy with the bottleneck (answers see only the latents) this far above chance.
SIGNATURE_MARGIN = 0.25
# metrics key of the accuracy under the bottleneck at the end of the bottleneck stage (``bottleneck_stage_record``).
BOTTLENECK_STAGE_KEY = "bottleneck_stage"


def majority_rate(examples) -> dict:
    """Per task, the accuracy of always giving that task's most common gold answer."""
    answers = {}
    for ex in examples:
        answers.setdefault(ex.task, []).append(ex.answer)
    return {t: Counter(vals).most_common(1)[0][1] / len(vals) for t, vals in answers.items()}


@dataclass
class Verdict:
    """Did the model learn, judged against chance and the majority-class rate, and does it show
    the mechanism signature (accuracy with the bottleneck well above chance: at the end of the
    bottleneck stage when the metrics hold it, else with the bottleneck forced on the evaluated model)?"""

    learned: bool
    signature: Optional[bool]
    text: str
    # Accuracy clearly under chance (``scoring.below_chance_note``): wrong answers preferred, not guessed.
    below_chance: bool = False


def bottleneck_stage_record(history: Sequence[dict]) -> Optional[dict]:
    """The last epoch of training history (``Validate``'s records) that trained under the bottleneck
    rule and measured accuracy under it: ``{"accuracy", "global_step", "epoch"}``; None without one."""
    measured = [e for e in history if e.get("rule") == "bottleneck" and e.get("stage_rule_accuracy") is not None]
    if not measured:
        return None
    last = measured[-1]
    return {"accuracy": last["stage_rule_accuracy"], "global_step": last["global_step"], "epoch": last["epoch"]}


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def learning_verdict(metrics: dict, *, margin: float = LEARNED_MARGIN, min_distinct: int = MIN_DISTINCT_ANSWERS,
                     signature_margin: float = SIGNATURE_MARGIN) -> Verdict:
    """A plain-language verdict on ``metrics`` (``evaluate_model``'s dict, with ``majority``)."""
    accuracy = metrics["accuracy"]["average"]
    chance = _mean(metrics.get("chance", {}).values())
    majority = _mean(metrics.get("majority", {}).values())
    baseline = max(v for v in (chance, majority, 0.0) if v is not None)
    predictions = [r["prediction"] for r in metrics.get("predictions", [])]
    distinct = len({p for p in predictions if p is not None})
    # Open-ended tasks have no option count; they need the full number of distinct answers.
    options = min((n for n in metrics.get("options", {}).values() if n), default=min_distinct)
    needed = min(min_distinct, options)
    learned = accuracy >= baseline + margin and distinct >= needed
    lines = [f"accuracy {100 * accuracy:.1f}% against chance {_pct(chance)} and always-the-most-common-answer "
             f"{_pct(majority)}; {distinct} distinct answers given."]
    if learned:
        lines.append(f"Verdict: LEARNED (at least {100 * margin:.0f} points above both, and {needed}+ distinct answers).")
    else:
        why = []
        if accuracy < baseline + margin:
            why.append(f"accuracy is not {100 * margin:.0f} points above {100 * baseline:.1f}%")
        if distinct < needed:
            why.append(f"only {distinct} distinct answer(s)")
        lines.append(f"Verdict: DID NOT LEARN ({'; '.join(why)}).")
    note = below_chance_note(metrics)
    if note:
        lines.append(note)
    probes = metrics.get("probes") or {}
    forced = probes.get("bottleneck_forced")
    stage = metrics.get(BOTTLENECK_STAGE_KEY)
    signature = None
    if chance is not None and stage and stage.get("accuracy") is not None:
        # Judged where the mechanism is trained: at the end of the bottleneck stage.
        signature = stage["accuracy"] >= chance + signature_margin
        shown = "shown" if signature else "NOT shown"
        lines.append(f"Mechanism signature {shown}: at the end of the bottleneck stage (step {stage['global_step']}) the "
                     f"answers, which see only the latents, were {100 * stage['accuracy']:.1f}% right (chance "
                     f"{100 * chance:.1f}%).")
        if forced:
            kept = "keeps" if forced["average"] >= chance + signature_margin else "has NOT kept"
            lines.append(f"The evaluated checkpoint, after the standard-mask stage, {kept} that route: "
                         + "; ".join(_probe_details(probes, accuracy, chance)) + ".")
    elif forced and chance is not None:
        signature = forced["average"] >= chance + signature_margin
        shown = "shown" if signature else "NOT shown"
        lines.append(f"Mechanism signature {shown}: " + "; ".join(_probe_details(probes, accuracy, chance)) + ".")
    return Verdict(learned=learned, signature=signature, text="\n".join(lines), below_chance=note is not None)


def _probe_details(probes: dict, accuracy: float, chance: float) -> list:
    forced = probes["bottleneck_forced"]["average"]
    removed = probes.get("latents_removed")
    attention = probes.get("answer_to_latent_attention")
    detail = [f"with the bottleneck forced at test {100 * forced:.1f}% (chance {100 * chance:.1f}%)"]
    if removed:
        detail.append(f"with the latents removed {100 * removed['average']:.1f}% "
                      f"(a drop of {100 * (accuracy - removed['average']):.1f} points)")
    if attention is not None:
        detail.append(f"mean answer->latent attention {attention:.3f}")
    return detail


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
