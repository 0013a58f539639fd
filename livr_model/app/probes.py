"""The LIVR paper's probes (section 5) and ``evaluate_model``, which runs accuracy and the probes.

The probes: the mean attention mass that answer tokens put on the latent tokens; accuracy with
the latents removed from the prompt; accuracy with the bottleneck mask forced at test time; and a
heatmap of latent-to-image attention drawn over the input image. Which of them apply is the
mode's choice (``livr_model.modes``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from livr_kernels import Segment
from livr_model.modes import PROBE_ANSWER_ATTENTION, PROBE_BOTTLENECK_FORCED, PROBE_HEATMAP, PROBE_LATENTS_REMOVED, get_mode
from livr_model.prompts import PromptEncoder

from .figures import draw_heatmap
from .files import atomic_write_json
from .predict import chunks, device_of, eval_mode, predict, rule_forced
from .scoring import chance_accuracy, metrics_table, result_from_records

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
def latent_image_attention(model, handle, encoder: PromptEncoder, example) -> Optional[list]:
    """Per image of ``example``, a 2-D map (merged patch grid) of the attention the latent tokens pay
    to its image tokens, averaged over layers, heads and latents. None when there are no latents or
    the model gives no ``image_grid_thw`` (non-Qwen layouts)."""
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
    per_token = weights[queries][:, keys].mean(dim=0)
    merge = _merge_size(model, encoder.processor)
    maps, start = [], 0
    for t, h, w in grid_thw.tolist():
        rows, cols = h // merge, w // merge
        count = t * rows * cols
        maps.append(per_token[start:start + count].reshape(t, rows, cols).mean(dim=0))
        start += count
    if start != per_token.numel():
        raise ValueError(f"image_grid_thw accounts for {start} image tokens but the prompt holds {per_token.numel()}")
    return maps


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
                maps = latent_image_attention(model, handle, encoder, examples[0])
            if maps is not None:
                shown = encoder.prepare(examples[0]).images
                draw_heatmap(shown, maps, Path(output_dir) / HEATMAP_FILE)
                probe[PROBE_HEATMAP] = HEATMAP_FILE
        metrics["probes"] = probe
    if extra:
        metrics.update(extra)
    if output_dir is not None:
        atomic_write_json(Path(output_dir) / METRICS_FILE, metrics)
    if verbose:
        print(metrics_table(metrics), flush=True)
    return metrics
