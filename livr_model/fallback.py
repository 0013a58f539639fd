"""The explicit patch path: replace the forward of each text attention module.

For models whose text layers choose their attention through their own class table rather than
transformers' registry (LLaVA-OneVision-1.5's remote code), ``set_attn_implementation`` cannot
reach the attention, so ``patch_attention`` uses this path when the model's ``ArchSpec`` names a
``ModulePatch``. Each attention module found at ``ModulePatch.layers[i].<attention>`` gets an
instance-level ``forward`` that keeps the module's own projections, q/k norms, rotary embedding
(the function its own Python module defines) and KV cache, and replaces only the attention itself
with ``livr_attention_forward`` under the handle's current per-forward state. ``remove()`` deletes
the instance attributes, so the class's forward is back.

The per-forward state (segment layout, rule, probe capture) reaches the modules through this
object, not through keyword arguments: such models do not pass extra keywords down to their
attention. It stays set after the forward, so gradient checkpointing can replay a layer in the
backward pass of the same step.
"""
from __future__ import annotations

import sys
import types
from typing import Callable, List, Optional

import torch

from .archs import ModulePatch

# Attributes every patched attention module must have.
REQUIRED_ATTRIBUTES = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")
QK_NORM_ATTRIBUTES = ("q_norm", "k_norm")


def _resolve(root, path: str):
    node = root
    for part in path.split("."):
        if not hasattr(node, part):
            raise ValueError(f"{type(root).__name__} has no {path!r} (stopped at {part!r}); the ModulePatch of its "
                             "ArchSpec must name the attribute path to the text decoder layers")
        node = getattr(node, part)
    return node


class ModuleForwardPatch:
    """Installed by ``patch_attention`` for a ``ModulePatch`` architecture; ``state`` is set by the
    handle before every forward."""

    def __init__(self, model: torch.nn.Module, spec: ModulePatch, attention_fn: Callable, state_kwarg: str):
        self.spec = spec
        self.state = None
        self._attention_fn = attention_fn
        self._state_kwarg = state_kwarg
        layers = _resolve(model, spec.layers)
        self.modules: List[torch.nn.Module] = []
        for index, layer in enumerate(layers):
            module = getattr(layer, spec.attention, None)
            if module is None:
                raise ValueError(f"text layer {index} has no {spec.attention!r} attention module")
            needed = REQUIRED_ATTRIBUTES + (QK_NORM_ATTRIBUTES if spec.qk_norm else ())
            missing = [name for name in needed if not hasattr(module, name)]
            if missing:
                raise ValueError(f"{type(module).__name__} (text layer {index}) lacks {missing}; the module patch "
                                 "needs the q/k/v/o projections and head_dim (and q_norm/k_norm when qk_norm is set)")
            if "forward" in vars(module):
                raise ValueError(f"{type(module).__name__} (text layer {index}) already has a patched forward")
            self.modules.append(module)
        if not self.modules:
            raise ValueError(f"{spec.layers!r} holds no text layers")
        home = sys.modules[type(self.modules[0]).__module__]
        self.rotary = getattr(home, spec.rotary, None)
        if not callable(self.rotary):
            raise ValueError(f"module {home.__name__} defines no rotary function {spec.rotary!r}")
        for module in self.modules:
            module.forward = types.MethodType(self._forward, module)

    def remove(self) -> None:
        for module in self.modules:
            vars(module).pop("forward", None)
        self.modules = []

    def _forward(self, module, hidden_states: torch.Tensor, attention_mask=None, position_ids=None,
                 past_key_value=None, output_attentions: bool = False, use_cache: bool = False,
                 cache_position=None, position_embeddings=None, **kwargs):
        # attention_mask and position_ids are the model's own; the segment layout carries padding and
        # the kinds, and position_embeddings the positions.
        state = self.state
        if state is None:
            raise ValueError("a patched attention module ran outside a forward of its patched model")
        if position_embeddings is None:
            raise ValueError(f"{type(module).__name__} got no position_embeddings; the module patch applies the "
                             "model's rotary embedding to the (cos, sin) its text model computes")
        shape = hidden_states.shape[:-1]
        heads = (*shape, -1, module.head_dim)
        query = module.q_proj(hidden_states).view(heads)
        key = module.k_proj(hidden_states).view(heads)
        value = module.v_proj(hidden_states).view(heads)
        if self.spec.qk_norm:
            query, key = module.q_norm(query), module.k_norm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        cos, sin = position_embeddings
        query, key = self.rotary(query, key, cos, sin)
        if past_key_value is not None:
            key, value = past_key_value.update(key, value, module.layer_idx,
                                               {"sin": sin, "cos": cos, "cache_position": cache_position})
        dropout = getattr(module, "attention_dropout", 0.0) if module.training else 0.0
        out, weights = self._attention_fn(module, query, key, value, None, scaling=getattr(module, "scaling", None),
                                          dropout=dropout, output_attentions=output_attentions, **{self._state_kwarg: state})
        out = module.o_proj(out.reshape(*shape, -1))
        weights = weights if output_attentions else None
        return (out, weights, past_key_value) if self.spec.returns_cache else (out, weights)


def install(model, spec: Optional[ModulePatch], attention_fn: Callable, state_kwarg: str) -> Optional[ModuleForwardPatch]:
    """The module patch for ``spec`` (None when the architecture uses the registry path).
    ``attention_fn`` is called like a registry attention function, the state under ``state_kwarg``."""
    return None if spec is None else ModuleForwardPatch(model, spec, attention_fn, state_kwarg)
