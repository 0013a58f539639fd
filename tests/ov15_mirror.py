"""A small module tree with the structure of LLaVA-OneVision-1.5's public remote code
(``modeling_llavaonevision1_5.py``), written for these tests: the text attention class is chosen
from the module's own table by ``config._attn_implementation`` (never through transformers'
registry), Qwen3-style per-head q/k RMS norms come before a 1-D rotary embedding applied by a
module-level ``apply_rotary_pos_emb(q, k, cos, sin)``, decoder layers call ``self_attn`` with
keywords and no extra ones, the attention returns ``(output, weights, cache)``, and the text model
sits at ``model.language_model.layers``. No vision tower: image placeholder ids are ordinary
embeddings here, which is all the attention patch sees.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

IMAGE_TOKEN_ID = 60
VIDEO_TOKEN_ID = 61
VOCAB = 64
NEG = -1e9


class MirrorTextConfig(PretrainedConfig):
    model_type = "llavaonevision1_5_text"

    def __init__(self, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_hidden_layers=2,
                 vocab_size=VOCAB, rope_theta=10000.0, rms_norm_eps=1e-6, attention_dropout=0.0, **kwargs):
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.num_hidden_layers = num_hidden_layers
        self.vocab_size = vocab_size
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.attention_dropout = attention_dropout
        super().__init__(**kwargs)


class MirrorConfig(PretrainedConfig):
    model_type = "llavaonevision1_5"

    def __init__(self, text_config=None, image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID, **kwargs):
        self.text_config = text_config if isinstance(text_config, MirrorTextConfig) else MirrorTextConfig(**(text_config or {}))
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        super().__init__(**kwargs)


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class RMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class Rotary(nn.Module):
    def __init__(self, config):
        super().__init__()
        exponents = torch.arange(0, config.head_dim, 2).float() / config.head_dim
        self.register_buffer("inv_freq", 1.0 / config.rope_theta ** exponents, persistent=False)

    def forward(self, x, position_ids):
        angles = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class EagerAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.attention_dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def project(self, hidden_states, position_embeddings, past_key_value, cache_position):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_norm(self.q_proj(hidden_states).view(shape)).transpose(1, 2)
        k = self.k_norm(self.k_proj(hidden_states).view(shape)).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_value is not None:
            k, v = past_key_value.update(k, v, self.layer_idx, {"sin": sin, "cos": cos, "cache_position": cache_position})
        return q, k.repeat_interleave(self.num_key_value_groups, 1), v.repeat_interleave(self.num_key_value_groups, 1)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None, output_attentions=False,
                use_cache=False, cache_position=None, position_embeddings=None):
        q, k, v = self.project(hidden_states, position_embeddings, past_key_value, cache_position)
        scores = q @ k.transpose(-1, -2) * self.head_dim ** -0.5 + attention_mask
        weights = scores.softmax(-1)
        out = (weights @ v).transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)
        return self.o_proj(out), (weights if output_attentions else None), past_key_value


class SdpaAttention(EagerAttention):
    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None, output_attentions=False,
                use_cache=False, cache_position=None, position_embeddings=None):
        q, k, v = self.project(hidden_states, position_embeddings, past_key_value, cache_position)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        return self.o_proj(out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)), None, past_key_value


ATTENTION_CLASSES = {"eager": EagerAttention, "sdpa": SdpaAttention}


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = ATTENTION_CLASSES[config._attn_implementation or "eager"](config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(config.hidden_size, 2 * config.hidden_size), nn.SiLU(),
                                 nn.Linear(2 * config.hidden_size, config.hidden_size))

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None, output_attentions=False,
                use_cache=False, cache_position=None, position_embeddings=None, **kwargs):
        attended, weights, cache = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask, position_ids=position_ids,
            past_key_value=past_key_value, output_attentions=output_attentions, use_cache=use_cache,
            cache_position=cache_position, position_embeddings=position_embeddings,
        )
        hidden_states = hidden_states + attended
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return (hidden_states, weights)


class TextModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Rotary(config)

    def forward(self, input_ids, attention_mask, past_key_values=None):
        hidden = self.embed_tokens(input_ids)
        batch, new = input_ids.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        positions = torch.arange(past, past + new)[None].expand(batch, -1)
        position_embeddings = self.rotary_emb(hidden, positions)
        mask = _additive_mask(attention_mask, new, past)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=positions, past_key_value=past_key_values,
                           use_cache=past_key_values is not None, cache_position=positions[0],
                           position_embeddings=position_embeddings)[0]
        return self.norm(hidden)


def _additive_mask(attention_mask, new, past):
    """A (B, 1, new, past + new) additive mask: a 4-D boolean mask is taken as given, a 2-D padding
    mask is combined with causality."""
    if attention_mask.dim() == 4:
        return torch.where(attention_mask, 0.0, NEG)
    keys = attention_mask.shape[1]
    causal = torch.arange(keys)[None, :] <= torch.arange(past, past + new)[:, None]
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    return torch.where(allowed, 0.0, NEG)[:, None]


class Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.language_model = TextModel(config.text_config)


@dataclass
class MirrorOutput:
    logits: torch.Tensor
    past_key_values: Optional[object] = None


class MirrorForConditionalGeneration(PreTrainedModel):
    config_class = MirrorConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        config.text_config._attn_implementation = config.text_config._attn_implementation or "eager"
        self.model = Model(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.language_model.embed_tokens

    def forward(self, input_ids=None, attention_mask=None, labels=None, past_key_values=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model.language_model(input_ids, attention_mask, past_key_values)
        return MirrorOutput(self.lm_head(hidden), past_key_values)


def build_mirror(seed: int = 0, attn_implementation: str = "sdpa") -> MirrorForConditionalGeneration:
    config = MirrorConfig()
    config.text_config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = MirrorForConditionalGeneration(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()
