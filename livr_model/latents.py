"""Latent tokens: K new special tokens whose input-embedding rows are the only embedding weights trained.

``add_latent_tokens`` adds ``<|latent_0|>`` ... to the tokenizer and model and initialises their
rows from the existing embeddings' statistics. ``restrict_embedding_grad`` then makes exactly
those rows trainable. It freezes the embedding matrix and trains a (K, hidden) offset added to
the latent rows' embeddings in the forward pass; the same effect as peft's
``trainable_token_indices`` (and usable alongside a peft LoRA model), and unlike a gradient mask
on the whole matrix it is immune to weight decay (AdamW would shrink every row), keeps optimizer
state at K rows instead of the whole vocabulary, and gives DDP K rows to all-reduce.
``latent_state_dict`` / ``load_latent_state_dict`` checkpoint just those rows, whichever of the
two mechanisms (or neither) is active.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .archs import tokenizer_of

LATENT_TOKEN_FORMAT = "<|latent_{}|>"
DEFAULT_NUM_LATENTS = 16
DELTA_PARAMETER = "livr_latent_delta"
HANDLE_ATTRIBUTE = "_livr_trainable_rows"
STATE_EMBEDDINGS = "embeddings"
STATE_TOKEN_IDS = "token_ids"


def latent_token_strings(k: int) -> List[str]:
    """``["<|latent_0|>", ..., "<|latent_{k-1}|>"]``."""
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise ValueError(f"k must be a positive int (number of latent tokens); got {k!r}")
    return [LATENT_TOKEN_FORMAT.format(i) for i in range(k)]


def _embedding_weight(model) -> torch.Tensor:
    embedding = model.get_input_embeddings()
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"model's input embeddings must be an nn.Embedding-like module with a 2-D weight; got {type(embedding).__name__}")
    return weight


@torch.no_grad()
def _init_rows(model, token_ids: Sequence[int], known_rows: int, generator) -> None:
    """Input rows ~ N(mean, std) per dimension of the first ``known_rows`` rows; output rows (when
    untied) = the mean output row, so the new tokens get no logit preference."""
    weight = _embedding_weight(model)
    index = torch.tensor(token_ids, device=weight.device)
    base = weight[:known_rows].float()
    mean, std = base.mean(0), base.std(0)
    noise = torch.randn((len(token_ids), weight.shape[1]), generator=generator, dtype=torch.float32)
    weight[index] = (mean + std * noise.to(weight.device)).to(weight.dtype)
    output = model.get_output_embeddings()
    output_weight = getattr(output, "weight", None)
    if isinstance(output_weight, torch.Tensor) and output_weight.data_ptr() != weight.data_ptr():
        output_weight[index] = output_weight[:known_rows].float().mean(0).to(output_weight.dtype)


def add_latent_tokens(model, processor, k: int = DEFAULT_NUM_LATENTS, seed=None) -> List[int]:
    """Add ``k`` latent special tokens to the tokenizer and model; return their ids.

    New rows are drawn from the existing input embeddings' per-dimension mean and std (``seed``
    fixes them; None uses torch's global generator). The embedding matrix is only grown, never
    shrunk: Qwen checkpoints carry spare rows beyond the tokenizer, and new ids land there.
    Calling again with the same ``k`` reuses the tokens already added (rows untouched); a
    tokenizer holding some but not all of them is an error.
    """
    strings = latent_token_strings(k)
    tokenizer = tokenizer_of(processor)
    if not hasattr(tokenizer, "add_tokens"):
        raise ValueError(f"processor must be a processor or tokenizer with add_tokens; got {type(processor).__name__}")
    vocab = tokenizer.get_vocab()
    present = [s for s in strings if s in vocab]
    rows = _embedding_weight(model).shape[0]
    if present and len(present) != k:
        raise ValueError(f"the tokenizer already holds {len(present)} of the {k} latent tokens ({present[:3]}...); "
                         "use the k it was prepared with")
    if len(present) == k:
        ids = [vocab[s] for s in strings]
        if max(ids) < rows:
            return ids
    else:
        added = tokenizer.add_tokens(strings, special_tokens=True)
        if added != k:
            raise ValueError(f"the tokenizer added {added} of {k} latent tokens; they clash with existing tokens")
        ids = tokenizer.convert_tokens_to_ids(strings)
    known_rows = min(rows, min(ids))
    if max(ids) >= rows:
        model.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
    generator = torch.Generator()
    if seed is None:
        generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    else:
        generator.manual_seed(seed)
    _init_rows(model, ids, known_rows, generator)
    return ids


def _check_token_ids(model, token_ids) -> List[int]:
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.flatten().tolist()
    if not isinstance(token_ids, (list, tuple)) or not token_ids:
        raise ValueError(f"token_ids must be a non-empty list of token ids; got {token_ids!r}")
    rows = _embedding_weight(model).shape[0]
    if any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < rows for i in token_ids):
        raise ValueError(f"token_ids must be ints in [0, {rows}) (rows of the input embedding); got {list(token_ids)}")
    if len(set(token_ids)) != len(token_ids):
        raise ValueError(f"token_ids must be distinct; got {list(token_ids)}")
    return list(token_ids)


class TrainableRows:
    """The handle ``restrict_embedding_grad`` returns: ``parameters()`` (the (K, hidden) offset the
    optimizer trains), ``token_ids``, and ``remove()``, which folds the trained offset into the
    embedding matrix and restores its ``requires_grad``."""

    def __init__(self, embedding: nn.Module, token_ids: List[int]):
        self.embedding = embedding
        self.token_ids = token_ids
        weight = embedding.weight
        self._weight_requires_grad = weight.requires_grad
        weight.requires_grad_(False)
        delta = nn.Parameter(torch.zeros(len(token_ids), weight.shape[1], dtype=weight.dtype, device=weight.device))
        embedding.register_parameter(DELTA_PARAMETER, delta)
        # Vocabulary id -> 1 + index into the offset table; 0 selects a zero row (every other token).
        slots = torch.zeros(weight.shape[0], dtype=torch.long)
        slots[torch.tensor(token_ids)] = torch.arange(1, len(token_ids) + 1)
        self._slots = slots
        self._hook = embedding.register_forward_hook(self._add_offsets)
        setattr(embedding, HANDLE_ATTRIBUTE, self)

    @property
    def delta(self) -> nn.Parameter:
        return getattr(self.embedding, DELTA_PARAMETER)

    def parameters(self) -> List[nn.Parameter]:
        return [self.delta]

    def _add_offsets(self, module, args, output):
        input_ids = args[0]
        if self._slots.device != input_ids.device:
            self._slots = self._slots.to(input_ids.device)
        delta = self.delta
        table = torch.cat([delta.new_zeros(1, delta.shape[1]), delta]).to(output.dtype)
        return output + F.embedding(self._slots[input_ids], table)

    @torch.no_grad()
    def effective_rows(self) -> torch.Tensor:
        index = torch.tensor(self.token_ids, device=self.embedding.weight.device)
        return self.embedding.weight[index] + self.delta.to(self.embedding.weight.dtype)

    @torch.no_grad()
    def set_rows(self, rows: torch.Tensor) -> None:
        index = torch.tensor(self.token_ids, device=self.embedding.weight.device)
        self.delta.copy_(rows.to(self.delta) - self.embedding.weight[index].to(self.delta))

    def remove(self) -> None:
        if getattr(self.embedding, HANDLE_ATTRIBUTE, None) is not self:
            return
        with torch.no_grad():
            rows = self.effective_rows()
            self.embedding.weight[torch.tensor(self.token_ids, device=rows.device)] = rows
        self._hook.remove()
        del self.embedding._parameters[DELTA_PARAMETER]
        delattr(self.embedding, HANDLE_ATTRIBUTE)
        self.embedding.weight.requires_grad_(self._weight_requires_grad)


def restrict_embedding_grad(model, token_ids) -> TrainableRows:
    """Train only the input-embedding rows of ``token_ids``; every other row stays bit-identical.

    Call it after ``peft.get_peft_model`` (peft freezes every non-adapter parameter it finds) and
    build the optimizer from ``requires_grad`` parameters: the new (K, hidden) offset is one.
    """
    token_ids = _check_token_ids(model, token_ids)
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(
            f"model's input embeddings must be a plain nn.Embedding; got {type(embedding).__name__} "
            "(a peft trainable_token_indices wrapper already restricts the rows)"
        )
    if getattr(embedding, HANDLE_ATTRIBUTE, None) is not None:
        raise ValueError("restrict_embedding_grad is already active on this model; remove() the existing handle first")
    return TrainableRows(embedding, token_ids)


def _peft_token_layer(embedding):
    """(layer, adapter name) when ``embedding`` is peft's trainable-tokens wrapper, else None."""
    deltas = getattr(embedding, "trainable_tokens_delta", None)
    if deltas is None:
        layer = getattr(embedding, "token_adapter", None)
        deltas = getattr(layer, "trainable_tokens_delta", None)
        embedding = layer
    if not isinstance(deltas, nn.ParameterDict) or not deltas:
        return None
    adapter = embedding.active_adapters[0] if getattr(embedding, "active_adapters", None) else next(iter(deltas))
    return embedding, adapter


def latent_state_dict(model, token_ids) -> Dict[str, torch.Tensor]:
    """``{"embeddings": (K, hidden) float32 on CPU, "token_ids": (K,) int64}``: the rows the model
    uses for ``token_ids`` now (read through the embedding's forward, so a restrict handle's or
    peft's trainable tokens are included)."""
    token_ids = _check_token_ids(model, token_ids)
    embedding = model.get_input_embeddings()
    device = _embedding_weight(model).device
    with torch.no_grad():
        rows = embedding(torch.tensor(token_ids, device=device))
    return {STATE_EMBEDDINGS: rows.detach().float().cpu().contiguous(),
            STATE_TOKEN_IDS: torch.tensor(token_ids, dtype=torch.long)}


def load_latent_state_dict(model, state: Dict[str, torch.Tensor], token_ids) -> None:
    """Write ``latent_state_dict`` rows back into the model for ``token_ids`` (which must match the
    ids they were saved with): into a restrict handle's offset, peft's trainable tokens, or the
    embedding matrix itself."""
    token_ids = _check_token_ids(model, token_ids)
    if not isinstance(state, dict) or STATE_EMBEDDINGS not in state or STATE_TOKEN_IDS not in state:
        raise ValueError(f"state must be a latent_state_dict with keys {STATE_EMBEDDINGS!r} and {STATE_TOKEN_IDS!r}")
    rows, saved_ids = state[STATE_EMBEDDINGS], state[STATE_TOKEN_IDS]
    weight = _embedding_weight(model)
    if tuple(rows.shape) != (len(token_ids), weight.shape[1]):
        raise ValueError(f"state embeddings must be shaped ({len(token_ids)}, {weight.shape[1]}); got {tuple(rows.shape)}")
    if saved_ids.flatten().tolist() != token_ids:
        raise ValueError(f"token_ids {token_ids} differ from the ids the state was saved with {saved_ids.tolist()}; "
                         "add the latent tokens to the same tokenizer before loading")
    embedding = model.get_input_embeddings()
    handle = getattr(embedding, HANDLE_ATTRIBUTE, None)
    if handle is not None:
        handle.set_rows(rows)
        return
    peft_layer = _peft_token_layer(embedding)
    with torch.no_grad():
        if peft_layer is not None:
            layer, adapter = peft_layer
            indices = list(layer.token_indices[adapter])
            delta = layer.trainable_tokens_delta[adapter]
            for row, token_id in zip(rows, token_ids):
                if token_id not in indices:
                    raise ValueError(f"token id {token_id} is not among peft's trainable_token_indices {indices}")
                delta[indices.index(token_id)] = row.to(delta)
            return
        weight[torch.tensor(token_ids, device=weight.device)] = rows.to(weight)
