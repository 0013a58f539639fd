"""``patch_attention``: the LIVR segment mask inside a transformers vision-language model.

How it plugs in, using only transformers' extension points:

* a ``"livr"`` attention backend is registered with ``AttentionInterface`` (it calls
  ``livr_kernels.segment_attention``) and ``AttentionMaskInterface`` (it returns no mask: padding
  travels as PAD segment ids, so no N x N tensor is ever built);
* the language model alone is switched to it (``set_attn_implementation({"text_config": "livr"})``);
  the vision tower keeps its own attention;
* a forward pre-hook on the model turns each call's ``input_ids`` / ``labels`` / ``attention_mask``
  (or a user-given ``segment_ids=``) into a ``SegmentLayout`` built once per forward, and passes it
  down as a keyword argument: transformers forwards extra keyword arguments to every attention call,
  and gradient checkpointing replays a layer with the same arguments;
* with a KV cache the layout of the cached keys rides on the cache object, so decode steps extend
  it (its per-block summaries too) instead of rebuilding it; tokens added to a non-empty cache
  (generated tokens) are ANSWER.

The per-forward path never makes the host wait for the GPU: ids are derived with device-side
ops from id tables cached per device, and only ids a user passes as a tensor are range-checked
(one read-back; pass a prebuilt ``SegmentLayout`` to skip it).
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Optional, Tuple, Union

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from livr_kernels import AttentionRule, SegmentLayout, resolve_rule, segment_attention
from livr_kernels.attention import BACKENDS as KERNEL_BACKENDS
from livr_kernels.reference import reference_probs

from . import fallback
from .archs import ArchSpec, get_arch
from .forward_layout import AttentionCapture, ForwardState, check_2d, layout_for_forward, remember_keys
from .segment_ids import TokenIds, _as_id_tensor, build_segment_ids, segment_kinds

BACKEND_NAME = "livr"
# Keyword argument carrying the per-forward state from the pre-hook down to every attention call.
STATE_KWARG = "livr_state"
# Attribute set on a patched model, pointing at its handle.
HANDLE_ATTR = "_livr_handle"

DocIdsFn = Callable[[dict], Optional[torch.Tensor]]


def livr_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    sliding_window: Optional[int] = None,
    **kwargs,
):
    """The ``"livr"`` entry of transformers' attention registry."""
    state = kwargs.get(STATE_KWARG)
    if not isinstance(state, ForwardState):
        raise ValueError(
            "the 'livr' attention backend got no segment ids: enable it with livr_model.patch_attention(model), "
            "not with attn_implementation='livr' alone"
        )
    if attention_mask is not None:
        raise ValueError(
            "a patched model derives its mask from segment ids; pass a 2-D padding attention_mask "
            f"(batch, seq_len), not a prepared mask of shape {tuple(attention_mask.shape)}"
        )
    if dropout:
        raise ValueError(f"livr attention has no attention dropout; set the text config's attention_dropout to 0 (got {dropout})")
    if sliding_window is not None:
        raise ValueError("livr attention does not implement sliding-window layers; disable use_sliding_window")
    layout = state.layout
    if tuple(layout.shape) != (key.shape[0], key.shape[2]):
        raise ValueError(
            f"segment ids cover {tuple(layout.shape)} (batch, keys) but this layer attends over "
            f"({key.shape[0]}, {key.shape[2]}) keys; static or sliding caches are not supported, use the default DynamicCache"
        )
    query, key, value = _autocast_inputs(query, key, value)
    out = segment_attention(query, key, value, layout, rule=state.rule, scale=scaling, backend=state.kernel_backend)
    weights = None
    if state.capture is not None or kwargs.get("output_attentions"):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        with torch.no_grad():
            weights = reference_probs(query.float(), key.float(), layout.segment_ids, state.rule, layout.doc_ids, scale)
        if state.capture is not None:
            state.capture.weights.append(weights)
    return out.transpose(1, 2).contiguous(), weights


def _autocast_inputs(query, key, value):
    """Under autocast, run in the autocast dtype as SDPA would: rotary embeddings leave q and k in
    fp32 while v comes out of a bf16 matmul, and the kernels take one dtype."""
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return query.to(dtype), key.to(dtype), value.to(dtype)
    return query, key, value


def livr_attention_mask(*args, **kwargs) -> None:
    """The ``"livr"`` entry of the mask registry: no dense mask; PAD segment ids carry the padding."""
    return None


def register_backend() -> None:
    """Register the ``"livr"`` attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(BACKEND_NAME, livr_attention_forward)
    AttentionMaskInterface.register(BACKEND_NAME, livr_attention_mask)


def _unwrap(model) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    inner = model
    while hasattr(inner, "get_base_model"):
        base = inner.get_base_model()
        if base is inner:
            break
        inner = base
    if not isinstance(inner, torch.nn.Module) or not hasattr(inner, "set_attn_implementation"):
        raise ValueError(f"model must be a transformers PreTrainedModel or a peft PeftModel; got {type(model).__name__}")
    return inner


class LivrAttentionHandle:
    """Returned by ``patch_attention``: switch rules, capture attention, undo the patch."""

    def __init__(
        self,
        model: torch.nn.Module,
        spec: ArchSpec,
        rule: AttentionRule,
        image_token_ids: torch.Tensor,
        latent_token_ids: torch.Tensor,
        doc_ids: Optional[DocIdsFn],
        kernel_backend: str,
    ):
        self.model = model
        self.arch = spec
        self._rule = rule
        self.image_token_ids = tuple(image_token_ids.tolist())
        self.latent_token_ids = tuple(latent_token_ids.tolist())
        self._image_ids = image_token_ids
        self._latent_ids = latent_token_ids
        self._doc_ids_fn = doc_ids
        self.kernel_backend = kernel_backend
        self._capture: Optional[AttentionCapture] = None
        self._segment_override: Optional[Union[torch.Tensor, SegmentLayout]] = None
        # (image ids, latent ids) per device, copied once: a copy per forward would wait for the GPU.
        self._id_tables: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}
        text_config = spec.text_config(model.config)
        self._text_config = text_config
        self._original_implementation = text_config._attn_implementation
        self._positional_names = [
            name
            for name, p in inspect.signature(model.forward).parameters.items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        # Models whose attention bypasses the registry get their modules' forward replaced instead.
        self._module_patch = fallback.install(model, spec.module_patch, livr_attention_forward, STATE_KWARG)
        if self._module_patch is None:
            model.set_attn_implementation({spec.text_config_key: BACKEND_NAME})
        if self._module_patch is None and text_config._attn_implementation != BACKEND_NAME:
            raise ValueError(
                f"could not switch the language model of {type(model).__name__} to the 'livr' attention backend "
                f"(it reports {text_config._attn_implementation!r}); its layers must use transformers' AttentionInterface"
            )
        self._hooks = [
            model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            model.register_forward_hook(self._post_forward, with_kwargs=True),
        ]
        setattr(model, HANDLE_ATTR, self)

    @property
    def rule(self) -> AttentionRule:
        return self._rule

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def _check_active(self, what: str) -> None:
        if not self._hooks:
            raise RuntimeError(
                f"{what} on a removed LivrAttentionHandle has no effect: the model runs its own attention "
                "since handle.remove(); call patch_attention(model, ...) again for a new handle"
            )

    def set_rule(self, rule: Union[str, AttentionRule]) -> AttentionRule:
        """Switch the rule for the following forwards (e.g. ``"standard"`` for stage 2)."""
        self._check_active("set_rule")
        self._rule = resolve_rule(rule)
        return self._rule

    def remove(self) -> None:
        """Back to the model's own attention; hooks gone. Calling it twice is harmless."""
        if not self._hooks:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._module_patch is not None:
            self._module_patch.remove()
        else:
            self.model.set_attn_implementation({self.arch.text_config_key: self._original_implementation})
        if getattr(self.model, HANDLE_ATTR, None) is self:
            delattr(self.model, HANDLE_ATTR)

    @contextmanager
    def capture_attention(self) -> Iterator[AttentionCapture]:
        """Record the dense attention probabilities of each forward run inside the block (the latest
        forward's, one tensor per text layer). Reference math, O(N^2) memory: probes and eval only."""
        self._check_active("capture_attention")
        capture = AttentionCapture()
        previous, self._capture = self._capture, capture
        try:
            yield capture
        finally:
            self._capture = previous

    @contextmanager
    def use_segment_ids(self, segment_ids: Union[torch.Tensor, SegmentLayout]) -> Iterator[None]:
        """Inside the block, forwards that get no ``segment_ids=`` use these (B, N) kinds (or this
        prebuilt ``SegmentLayout``).

        This is how custom kinds reach ``model.generate``, which refuses unknown keyword arguments:
        give the prompt's kinds (repeated per beam when beam searching); decode steps then reuse
        the cached keys' kinds and mark generated tokens ANSWER."""
        self._check_active("use_segment_ids")
        if not isinstance(segment_ids, SegmentLayout):
            batch = segment_ids.shape[0] if isinstance(segment_ids, torch.Tensor) else -1
            check_2d("segment_ids", segment_ids, batch)
        previous, self._segment_override = self._segment_override, segment_ids
        try:
            yield
        finally:
            self._segment_override = previous

    def build_segment_ids(self, input_ids, labels=None, attention_mask=None) -> torch.Tensor:
        """``build_segment_ids`` with this model's image and latent ids."""
        return build_segment_ids(
            input_ids,
            image_token_ids=self._image_ids,
            latent_token_ids=self._latent_ids,
            labels=labels,
            attention_mask=attention_mask,
        )

    def _pre_forward(self, module, args, kwargs):
        if self._module_patch is None and self._text_config._attn_implementation != BACKEND_NAME:
            raise ValueError(
                f"the language model's attention was switched to {self._text_config._attn_implementation!r} after "
                "patch_attention; call handle.remove() before changing it, then patch again"
            )
        if args:
            if len(args) > len(self._positional_names):
                raise ValueError(f"{type(module).__name__}.forward got {len(args)} positional arguments")
            kwargs = dict(kwargs)
            kwargs.update(zip(self._positional_names, args))
            args = ()
        user_segment_ids = kwargs.pop("segment_ids", None)
        offered_prompt = user_segment_ids is None and self._segment_override is not None
        if user_segment_ids is None:
            user_segment_ids = self._segment_override
        user_doc_ids = kwargs.pop("doc_ids", None)
        if user_doc_ids is None and self._doc_ids_fn is not None:
            user_doc_ids = self._doc_ids_fn(kwargs)
        layout = self._layout_for(kwargs, user_segment_ids, user_doc_ids, offered_prompt=offered_prompt)
        capture = self._capture
        if capture is not None:
            capture.weights = []
            capture.segment_ids = layout.segment_ids.long()
        state = ForwardState(layout, self._rule, self.kernel_backend, capture)
        if self._module_patch is not None:
            self._module_patch.state = state
        else:
            kwargs[STATE_KWARG] = state
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            remember_keys(cache, layout)
        return args, kwargs

    def _post_forward(self, module, args, kwargs, output):
        # A cache the model created itself (use_cache=True without one) only shows up in the output.
        state = kwargs.get(STATE_KWARG, self._module_patch.state if self._module_patch is not None else None)
        if state is None or isinstance(output, tuple):
            return output
        cache = getattr(output, "cache", None)
        if cache is None:
            cache = getattr(output, "past_key_values", None)
        if cache is not None:
            remember_keys(cache, state.layout)
        return output

    def _layout_for(self, kwargs: dict, user_segment_ids, user_doc_ids, offered_prompt: bool = False) -> SegmentLayout:
        return layout_for_forward(
            kwargs, user_segment_ids, user_doc_ids, lambda: self._derived_ids(kwargs, kwargs.get("input_ids")),
            offered_prompt=offered_prompt,
        )

    def _derived_ids(self, kwargs: dict, input_ids: Optional[torch.Tensor]) -> torch.Tensor:
        if input_ids is None:
            raise ValueError(
                "cannot derive segment ids from inputs_embeds alone: pass input_ids, or segment_ids=(batch, seq_len) "
                "with a livr_kernels.Segment kind per token"
            )
        labels = kwargs.get("labels")
        if labels is not None and tuple(labels.shape) != tuple(input_ids.shape):
            raise ValueError(f"labels must be shaped like input_ids {tuple(input_ids.shape)}; got {tuple(labels.shape)}")
        device = input_ids.device
        if device not in self._id_tables:
            self._id_tables[device] = (self._image_ids.to(device), self._latent_ids.to(device))
        image, latent = self._id_tables[device]
        return segment_kinds(input_ids, image, latent, labels)

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"LivrAttentionHandle({type(self.model).__name__}, rule={self._rule.name!r}, {state})"


def patch_attention(
    model,
    rule: Union[str, AttentionRule] = "bottleneck",
    latent_token_ids: TokenIds = (),
    doc_ids: Optional[DocIdsFn] = None,
    *,
    kernel_backend: str = "auto",
) -> LivrAttentionHandle:
    """Route the language model's attention through the LIVR segment kernel.

    ``model``: a transformers vision-language model listed in ``livr_model.archs`` (or a peft
    ``PeftModel`` around one). ``rule``: a name from ``livr_kernels.RULES`` or an ``AttentionRule``.
    ``latent_token_ids``: the ids of the K latent tokens (within the embedding table). ``doc_ids``:
    optional callable ``fn(forward_kwargs) -> (B, N) document ids`` for packed sequences (a forward
    may also pass ``doc_ids=`` itself). ``kernel_backend``: passed to ``segment_attention``.

    A forward may pass ``segment_ids=`` as a (B, N) tensor (range-checked: one read-back from the
    device) or as a prebuilt ``livr_kernels.SegmentLayout`` (used as is, padding already PAD, no
    read-back: the way to keep a training step free of host-device synchronisation).

    Every forward then derives segment kinds from ``input_ids``, ``labels`` and ``attention_mask``
    (or takes ``segment_ids=(B, N)`` from the caller) and applies the rule; the returned handle
    switches rules, captures attention for probes, and removes the patch.
    """
    rule = resolve_rule(rule)
    if kernel_backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}; got {kernel_backend!r}")
    if doc_ids is not None and not callable(doc_ids):
        raise ValueError(
            "doc_ids must be None or a callable taking the forward's keyword arguments and returning (batch, seq_len) "
            f"document ids; got {type(doc_ids).__name__} (pass per-batch doc_ids= to the forward instead)"
        )
    inner = _unwrap(model)
    existing = getattr(inner, HANDLE_ATTR, None)
    if existing is not None and existing.active:
        raise ValueError("model is already patched: use handle.set_rule(...) to change the rule, or handle.remove() first")
    spec = get_arch(inner)
    image_ids = _as_id_tensor("image_token_ids", spec.placeholder_token_ids(inner.config), "cpu")
    latent_ids = _as_id_tensor("latent_token_ids", latent_token_ids, "cpu")
    # Rows of the weight, not num_embeddings: peft's TrainableTokensWrapper (trainable_token_indices) lacks it.
    vocab_size = inner.get_input_embeddings().weight.shape[0]
    outside = [i for i in latent_ids.tolist() if not 0 <= i < vocab_size]
    if outside:
        raise ValueError(
            f"latent_token_ids {outside} are outside the vocabulary [0, {vocab_size}); add the latent tokens to the "
            "tokenizer and resize the embeddings first"
        )
    clash = sorted(set(latent_ids.tolist()) & set(image_ids.tolist()))
    if clash:
        raise ValueError(f"latent_token_ids {clash} are image/video placeholder ids of this model")
    register_backend()
    return LivrAttentionHandle(inner, spec, rule, image_ids, latent_ids, doc_ids, kernel_backend)


def get_handle(model) -> Optional[LivrAttentionHandle]:
    """The active handle of a patched model (or peft wrapper), else None."""
    try:
        inner = _unwrap(model)
    except ValueError:
        return None
    handle = getattr(inner, HANDLE_ATTR, None)
    return handle if handle is not None and handle.active else None
