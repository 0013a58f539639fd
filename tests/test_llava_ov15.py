"""LLaVA-OneVision-1.5 through the explicit module patch (on a mirror of its remote code's module
tree, tests/ov15_mirror.py), the remote-code shims for transformers 5, and Qwen3.5's refusal."""
import json
import subprocess
import sys

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import DynamicCache, Qwen3_5Config

from livr_kernels import Segment
from livr_kernels.reference import segment_mask
from livr_model import build_segment_ids, get_arch, patch_attention
from livr_model.app import models as app_models
from livr_model.compat import AttentionMaskConverter, default_rope_parameters
from ov15_mirror import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, MirrorTextConfig, build_mirror

EXACT = 1e-5
LATENT_IDS = (50, 51)
# Two left-padded rows: text, two image tokens, text, two latents, text, answer.
ROWS = [[0, 0, 5, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 7, 50, 51, 9, 11, 12],
        [3, 4, 5, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 8, 50, 51, 9, 13, 14]]
PADDING = [2, 0]
ANSWER_TOKENS = 2


def _batch():
    input_ids = torch.tensor(ROWS)
    attention_mask = torch.ones_like(input_ids)
    for row, pad in enumerate(PADDING):
        attention_mask[row, :pad] = 0
    labels = torch.full_like(input_ids, -100)
    labels[:, -ANSWER_TOKENS:] = input_ids[:, -ANSWER_TOKENS:]
    segments = build_segment_ids(input_ids, image_token_ids=(IMAGE_TOKEN_ID, VIDEO_TOKEN_ID), latent_token_ids=LATENT_IDS,
                                 labels=labels, attention_mask=attention_mask)
    return input_ids, attention_mask, labels, segments


def _real(attention_mask):
    return attention_mask.bool()


def _reference(model, input_ids, segments, rule):
    """The unpatched mirror with the rule's mask given to its own attention as a 4-D mask."""
    mask = segment_mask(segments, rule)[:, None]
    mask = mask | ~mask.any(-1, keepdim=True)  # PAD rows: anything finite, they are not compared
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask).logits


@pytest.mark.parametrize("rule", ["standard", "bottleneck", "bottleneck_answer_only"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_module_patch_applies_the_rule(rule, implementation):
    model = build_mirror(attn_implementation=implementation)
    input_ids, attention_mask, labels, segments = _batch()
    expected = _reference(model, input_ids, segments, rule)
    assert get_arch(model).module_patch is not None
    handle = patch_attention(model, rule=rule, latent_token_ids=LATENT_IDS)
    with torch.no_grad():
        got = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
    real = _real(attention_mask)
    assert torch.allclose(got[real], expected[real], atol=EXACT)
    # The class table's choice is untouched; only instance forwards were replaced, and remove() drops them.
    attention = [layer.self_attn for layer in model.model.language_model.layers]
    assert all("forward" in vars(module) for module in attention)
    handle.remove()
    assert not any("forward" in vars(module) for module in attention)
    with torch.no_grad():
        plain = model(input_ids=input_ids, attention_mask=attention_mask).logits
        causal = _reference(model, input_ids, segments, "standard")
    assert torch.allclose(plain[real], causal[real], atol=EXACT)


def test_attention_dropout_in_training_is_refused_not_dropped():
    """The kernels have no attention dropout: a layer that asks for it in training is an error, as on
    the registry path, never silently trained without it."""
    model = build_mirror()
    for layer in model.model.language_model.layers:
        layer.self_attn.attention_dropout = 0.1
    input_ids, attention_mask, labels, _ = _batch()
    patch_attention(model, rule="bottleneck", latent_token_ids=LATENT_IDS)
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)  # eval: no dropout asked for
    model.train()
    with pytest.raises(ValueError, match="no attention dropout"):
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def test_the_bottleneck_changes_what_text_sees():
    model = build_mirror()
    input_ids, attention_mask, labels, segments = _batch()
    standard = _reference(model, input_ids, segments, "standard")
    patch_attention(model, rule="bottleneck", latent_token_ids=LATENT_IDS)
    with torch.no_grad():
        got = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
    answer = segments == int(Segment.ANSWER)
    assert not torch.allclose(got[answer], standard[answer], atol=1e-3), "answers no longer see the image directly"


def test_decoding_with_a_cache_matches_the_full_forward():
    model = build_mirror()
    input_ids, attention_mask, labels, segments = _batch()
    patch_attention(model, rule="bottleneck", latent_token_ids=LATENT_IDS)
    prompt = input_ids[:, :-1]
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=prompt, attention_mask=attention_mask[:, :-1], segment_ids=segments[:, :-1], past_key_values=cache)
        step = model(input_ids=input_ids[:, -1:], attention_mask=attention_mask, past_key_values=cache).logits
        full = model(input_ids=input_ids, attention_mask=attention_mask, segment_ids=segments).logits
    assert torch.allclose(step[:, -1], full[:, -1], atol=EXACT)


def test_probes_capture_every_patched_layer():
    model = build_mirror()
    input_ids, attention_mask, labels, _ = _batch()
    handle = patch_attention(model, rule="bottleneck", latent_token_ids=LATENT_IDS)
    with handle.capture_attention() as capture, torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert len(capture.weights) == len(model.model.language_model.layers)
    assert capture.weights[0].shape == (2, 4, input_ids.shape[1], input_ids.shape[1])


def test_a_patched_module_refuses_to_run_outside_its_model():
    model = build_mirror()
    patch_attention(model, rule="bottleneck", latent_token_ids=LATENT_IDS)
    attention = model.model.language_model.layers[0].self_attn
    with pytest.raises(ValueError, match="outside a forward"):
        attention(hidden_states=torch.zeros(1, 3, 32), position_embeddings=(torch.ones(1, 3, 8), torch.zeros(1, 3, 8)))


SHIM_CHECK = """
import importlib, json
try:
    importlib.import_module("transformers.modeling_attn_mask_utils")
    mask_missing = False
except ImportError:
    mask_missing = True
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
rope_missing = "default" not in ROPE_INIT_FUNCTIONS
from livr_model.compat import install_remote_code_shims
added = install_remote_code_shims()
from transformers.modeling_attn_mask_utils import AttentionMaskConverter
print(json.dumps({"mask_missing": mask_missing, "rope_missing": rope_missing, "added": len(added),
                  "module": AttentionMaskConverter.__module__, "default": "default" in ROPE_INIT_FUNCTIONS,
                  "again": install_remote_code_shims()}))
"""


def test_remote_code_shims_make_the_old_imports_work():
    """The shims add exactly what this transformers lacks (5.24: both; 5.17 still has both) and never
    replace what exists."""
    out = subprocess.run([sys.executable, "-c", SHIM_CHECK], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["added"] == int(result["mask_missing"]) + int(result["rope_missing"])
    assert result["module"] == ("livr_model.compat" if result["mask_missing"] else "transformers.modeling_attn_mask_utils")
    assert result["default"] and result["again"] == []
    if transformers.__version__.startswith("5.24"):
        assert result["mask_missing"] and result["rope_missing"], "transformers 5.24 dropped both: the shims are needed"


def test_shim_helpers_do_what_the_remote_code_expects():
    low = torch.finfo(torch.float32).min
    mask = torch.tensor([[[[low, low], [0.0, low]]]])
    assert torch.equal(AttentionMaskConverter._unmask_unattended(mask, low), torch.tensor([[[[0.0, 0.0], [0.0, low]]]]))
    assert AttentionMaskConverter._ignore_causal_mask_sdpa(None, None, 0) is False
    config = MirrorTextConfig(head_dim=8, rope_theta=100.0)
    inv_freq, scaling = default_rope_parameters(config)
    assert scaling == 1.0 and torch.allclose(inv_freq, torch.tensor([1.0, 100.0 ** -0.25, 100.0 ** -0.5, 100.0 ** -0.75]))


def test_shims_are_installed_only_for_remote_code(monkeypatch):
    calls = []
    monkeypatch.setattr(app_models, "install_remote_code_shims", lambda: calls.append(True) or [])
    for name in ("AutoProcessor", "AutoModelForImageTextToText"):
        monkeypatch.setattr(getattr(app_models, name), "from_pretrained", staticmethod(lambda *a, **k: None))
    app_models.load_model_and_processor("some/model", trust_remote_code=False)
    assert calls == []
    app_models.load_model_and_processor("some/model", trust_remote_code=True)
    assert calls == [True]


def test_qwen3_5_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="linear-attention layers .* recurrent state"):
        get_arch(Qwen3_5Config())
    text = Qwen3_5Config().text_config
    assert "linear_attention" in text.layer_types and "full_attention" in text.layer_types


def test_an_unknown_model_with_linear_attention_layers_is_refused():
    config = Qwen3_5Config()
    config.model_type = "some_hybrid_vlm"
    with pytest.raises(ValueError, match=r"text layers of type \['linear_attention'\]"):
        get_arch(config)


def test_gradients_through_the_module_patch_match_the_reference():
    """Training goes through the patched modules: LoRA (peft) on the mirror, gradients as with the
    model's own attention given the bottleneck mask."""
    input_ids, attention_mask, labels, segments = _batch()
    real = _real(attention_mask)
    grads = {}
    for patched in (False, True):
        model = build_mirror(seed=1)
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=get_arch(model).lora_target_regex,
                                                      init_lora_weights=False))
        if patched:
            patch_attention(peft_model, rule="bottleneck", latent_token_ids=LATENT_IDS)
            logits = peft_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
        else:
            mask = segment_mask(segments, "bottleneck")[:, None]
            logits = peft_model(input_ids=input_ids, attention_mask=mask | ~mask.any(-1, keepdim=True)).logits
        logits[real].square().mean().backward()
        grads[patched] = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys() and any("self_attn.q_proj" in n for n in grads[True])
    for name, grad in grads[True].items():
        assert torch.allclose(grad, grads[False][name], atol=1e-5), name
