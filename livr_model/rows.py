"""Dataset rows -> chat turns and images: the row formats the prompt module and ``LivrCollator`` accept.

Three formats, told apart by their keys:

* TRL conversational: ``{"images": [...], "messages": [{"role": "user", "content": [{"type": "image"},
  {"type": "text", "text": ...}]}, {"role": "assistant", "content": ...}]}``;
* TRL prompt/completion: ``{"images": [...], "prompt": [turns] or "text", "completion": [turns] or "text"}``
  (a string prompt becomes one user turn holding the images, then the text);
* livr's JSONL row: ``{"images": [...], "question": ..., "choices": [...], "answer": ..., "task": ...}``.

Images are PIL images or file paths (relative to ``image_root``, else to the working directory);
``"image"`` (one image) is accepted for ``"images"``. Image parts may also carry their image inline
(``{"type": "image", "image": <PIL image or path>}``) when the row has no ``images``.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from PIL import Image

CHAT_ROLES = ("system", "user", "assistant")
LIVR_ROW_KEYS = ("question", "answer")
LIVR_OPTIONAL_KEYS = ("choices", "task")


def split_turns(messages: Sequence[dict], what: str = "messages") -> Tuple[List[dict], Optional[dict]]:
    """(prompt turns up to and including the last user turn, the assistant turn after it or None)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{what} must be a non-empty list of {{'role', 'content'}} turns; got {messages!r:.80}")
    for index, turn in enumerate(messages):
        if not isinstance(turn, dict) or turn.get("role") not in CHAT_ROLES or not isinstance(turn.get("content"), (str, list)):
            raise ValueError(f"{what}[{index}] must be a dict with role in {CHAT_ROLES} and str or list content; got {turn!r:.80}")
    users = [i for i, turn in enumerate(messages) if turn["role"] == "user"]
    if not users:
        raise ValueError(f"{what} holds no user turn")
    last = users[-1]
    rest = list(messages[last + 1:])
    if len(rest) > 1 or (rest and rest[0]["role"] != "assistant"):
        raise ValueError(f"{what}: after the last user turn there must be at most one assistant turn (the answer); "
                         f"got roles {[t['role'] for t in rest]}")
    return list(messages[: last + 1]), (rest[0] if rest else None)


def with_latents(turn: dict, latent_tokens: str) -> dict:
    """``turn`` with ``latent_tokens`` appended to its content (to its last text part when it ends in one)."""
    content = turn["content"]
    if isinstance(content, str):
        return {**turn, "content": content + latent_tokens}
    content = list(content)
    if content and isinstance(content[-1], dict) and content[-1].get("type") == "text":
        content[-1] = {**content[-1], "text": content[-1]["text"] + latent_tokens}
    else:
        content.append({"type": "text", "text": latent_tokens})
    return {**turn, "content": content}


def last_text(turn: dict) -> Optional[str]:
    """The text the turn's content ends with (None when it ends in an image)."""
    content = turn["content"]
    if isinstance(content, str):
        return content
    if content and isinstance(content[-1], dict) and content[-1].get("type") == "text":
        return content[-1]["text"]
    return None


def text_parts(turn: dict) -> list:
    """Every text the turn's content holds, in order (its string, or its text parts)."""
    content = turn["content"]
    if isinstance(content, str):
        return [content]
    return [part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"]


def _image_parts(turns: Sequence[dict]) -> list:
    return [part for turn in turns if isinstance(turn["content"], list) for part in turn["content"]
            if isinstance(part, dict) and part.get("type") == "image"]


def count_image_parts(turns: Sequence[dict]) -> int:
    return len(_image_parts(turns))


def load_image(value, image_root=None, what: str = "image") -> Image.Image:
    """A PIL image as is, or the RGB image at a path (relative to ``image_root`` when given)."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, Path)):
        path = Path(image_root) / value if image_root is not None else Path(value)
        if not path.is_file():
            raise ValueError(f"{what}: image file {str(value)!r} not found (looked for {path})")
        with Image.open(path) as image:
            return image.convert("RGB")
    raise ValueError(f"{what} must be a PIL image or a file path; got {type(value).__name__}")


def row_images(row: dict, image_root=None, what: str = "row") -> list:
    """The images of ``row`` (``images``, or ``image``), loaded."""
    images = row.get("images", row.get("image"))
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        images = [images]
    return [load_image(value, image_root, f"{what} images[{index}]") for index, value in enumerate(images)]


def is_livr_row(row) -> bool:
    return isinstance(row, dict) and all(key in row for key in LIVR_ROW_KEYS) and "messages" not in row and "prompt" not in row


def livr_row_fields(row: dict, image_root=None, what: str = "row") -> dict:
    """The ``Example`` fields of a livr JSONL row, images loaded."""
    fields = {key: row[key] for key in LIVR_ROW_KEYS}
    fields["answer"] = str(fields["answer"])
    fields["choices"] = row.get("choices") or []
    fields["task"] = row.get("task") or "custom"
    fields["images"] = row_images(row, image_root, what)
    return fields


def _as_turns(value, role: str, what: str) -> list:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValueError(f"{what} must be a string or a list of chat turns; got {type(value).__name__}")


def conversation_from_row(row: dict, image_root=None, what: str = "row") -> Tuple[List[dict], list]:
    """(chat turns, images) of a TRL conversational or prompt/completion row."""
    if not isinstance(row, dict):
        raise ValueError(f"{what} must be a dict (a dataset row); got {type(row).__name__}")
    if "messages" in row:
        turns = _as_turns(row["messages"], "user", f"{what} messages")
    elif "prompt" in row:
        prompt = row["prompt"]
        turns = _as_turns(prompt, "user", f"{what} prompt")
        if isinstance(prompt, str):
            count = len(row.get("images") or []) if "images" in row else int(row.get("image") is not None)
            turns = [{"role": "user", "content": [{"type": "image"} for _ in range(count)] + [{"type": "text", "text": prompt}]}]
        if row.get("completion") is not None:
            turns += _as_turns(row["completion"], "assistant", f"{what} completion")
    else:
        raise ValueError(f"{what} has none of the keys 'messages', 'prompt' or 'question'; got keys {sorted(row)}")
    images = row_images(row, image_root, what)
    if not images:
        inline = [part.get("image") for part in _image_parts(turns)]
        if any(value is not None for value in inline):
            if any(value is None for value in inline):
                raise ValueError(f"{what}: some image parts carry an image and others do not, and the row has no 'images'")
            images = [load_image(value, image_root, f"{what} image part") for value in inline]
    return turns, images
