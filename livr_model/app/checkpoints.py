"""The on-disk layout of a run: checkpoint directories, the pointers that commit them, pruning.

A run's output directory holds

    run_config.yaml / run_config.json   the TrainConfig that produced it
    checkpoints/step-00000040/          one directory per save
        adapter_model.safetensors       LoRA weights (peft's own key names)
        adapter_config.json             the peft LoraConfig
        latents.safetensors             the K latent embedding rows and their token ids
        tokenizer_additions.json        the latent token strings and ids
        run_config.json                 the run's config (so a checkpoint stands alone)
        training_state.pt               optimizer, scheduler, data position, best metric,
                                        data fingerprints (tensors and plain containers only)
        rng_state_rank{R}.pt            python/numpy/torch RNG of process R (tensors, plain values)
        info.json                       step, epoch, stage, validation metric, selected step
    latest.json                         pointer to the newest complete checkpoint (resume)
    selected.json                       pointer to the checkpoint to evaluate: best validation
                                        accuracy for a single-task run, the last one otherwise

Every file is written to a temporary name, fsynced and renamed; a checkpoint directory is
assembled under a temporary name and renamed into place only when complete, and the pointers
are updated after that, so a crash at any moment leaves the previous checkpoint usable.

Replacing a directory of the same name takes two renames (the old one aside to ``<name>.old``,
the new one in), and no portable rename swaps two directories. A kill between them leaves the
old checkpoint whole under ``<name>.old``: the loaders then read that copy (one line says so;
they rename nothing, so a read-only run directory loads too), and the next write renames it
back. Every write starts by tidying what a killed write or prune left: ``.tmp`` folders (never
complete as far as anyone knows), ``.old`` folders whose checkpoint exists again, and
``.deleting`` folders. A folder is only ever deleted under a ``.deleting`` name, so a ``.old``
folder is always whole.

Writing ``latest.json`` commits a checkpoint. The selection is part of that commit: each
checkpoint's info.json names the selected step as of that save, and loaders follow the latest
checkpoint's record (``selected.json`` is a copy for people and tools, repaired on resume), so a
crash between the two pointer writes loses nothing; pruning never deletes the selected step. A
pruned checkpoint is renamed to ``<name>.deleting`` before it is deleted, so a kill during the
deletion never leaves a half-deleted directory under a checkpoint's name.

``.pt`` files are read with ``torch.load(weights_only=True)``: tensors and plain containers
only, never pickled objects (a planted file is refused, not run).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

from .config import TrainConfig
from .files import TMP_SUFFIX, atomic_write_bytes, atomic_write_json, atomic_write_text, fsync_dir
from .trainer_runs import find_trainer_checkpoint

CHECKPOINTS_DIR = "checkpoints"
LATEST_POINTER = "latest.json"
SELECTED_POINTER = "selected.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
LATENT_WEIGHTS = "latents.safetensors"
TOKENIZER_ADDITIONS = "tokenizer_additions.json"
RUN_CONFIG_JSON = "run_config.json"
RUN_CONFIG_YAML = "run_config.yaml"
TRAINING_STATE = "training_state.pt"
RNG_STATE_TEMPLATE = "rng_state_rank{rank}.pt"
INFO = "info.json"
STEP_DIR_TEMPLATE = "step-{step:08d}"
OLD_SUFFIX = ".old"
DELETING_SUFFIX = ".deleting"
# A folder under a checkpoint's name that holds no checkpoint, set aside so its .old copy can return.
INCOMPLETE_SUFFIX = ".incomplete"
TRANSIENT_SUFFIXES = (TMP_SUFFIX, OLD_SUFFIX, DELETING_SUFFIX)
# Files every training checkpoint holds; a directory missing one is refused by the loaders.
REQUIRED_FILES = (INFO, RUN_CONFIG_JSON, ADAPTER_WEIGHTS, ADAPTER_CONFIG, TRAINING_STATE)
# Entries that mark a directory as holding a run (other files, e.g. the demo's base model, do not).
RUN_ENTRIES = (RUN_CONFIG_JSON, RUN_CONFIG_YAML, LATEST_POINTER, SELECTED_POINTER, CHECKPOINTS_DIR)


# Backups already reported by usable_checkpoint_dir: one line per copy, however often it is resolved.
_REPORTED_BACKUPS: set = set()


def checkpoint_dir_name(step: int) -> str:
    return STEP_DIR_TEMPLATE.format(step=step)


def write_checkpoint_dir(final_dir, files: Mapping[str, Any]) -> Path:
    """Assemble a checkpoint directory atomically.

    ``files`` maps a file name to bytes, str, or a callable that writes that file given its path.
    Everything is written into ``<final_dir>.tmp`` and the directory is renamed into place at the
    end; an existing directory of the same name is replaced (moved aside to ``<final_dir>.old``
    first, then deleted). What a killed earlier write left beside it is tidied first.
    """
    final_dir = Path(final_dir)
    tidy_checkpoints_root(final_dir.parent)
    tmp_dir = final_dir.with_name(final_dir.name + TMP_SUFFIX)
    tmp_dir.mkdir(parents=True)
    for name, content in files.items():
        target = tmp_dir / name
        if callable(content):
            content(target)
        elif isinstance(content, bytes):
            atomic_write_bytes(target, content)
        elif isinstance(content, str):
            atomic_write_text(target, content)
        else:
            raise ValueError(f"files[{name!r}] must be bytes, str or a callable writer; got {type(content).__name__}")
    fsync_dir(tmp_dir)
    old_dir = backup_dir(final_dir)
    if final_dir.exists():
        # old_dir cannot exist here: the tidy above renamed it back or deleted it.
        os.replace(final_dir, old_dir)
        fsync_dir(final_dir.parent)
    # Between these two renames the checkpoint lives only as old_dir (usable_checkpoint_dir reads it).
    os.replace(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)
    if old_dir.exists():
        delete_dir(old_dir)
    return final_dir


def backup_dir(checkpoint_dir) -> Path:
    checkpoint_dir = Path(checkpoint_dir)
    return checkpoint_dir.with_name(checkpoint_dir.name + OLD_SUFFIX)


def delete_dir(path) -> None:
    """Delete a folder under a ``.deleting`` name, so a kill midway never leaves a partial folder
    under a name the loaders read (a checkpoint's, or the ``.old`` copy they fall back to)."""
    path = Path(path)
    doomed = path if path.name.endswith(DELETING_SUFFIX) else path.with_name(path.name + DELETING_SUFFIX)
    if doomed != path:
        if doomed.exists():
            shutil.rmtree(doomed)
        os.replace(path, doomed)
        fsync_dir(path.parent)
    shutil.rmtree(doomed)


def _holds_checkpoint(path: Path) -> bool:
    return (path / INFO).is_file()


def usable_checkpoint_dir(checkpoint_dir) -> Optional[Path]:
    """``checkpoint_dir`` if it exists (and holds a checkpoint, or nothing better is there); else its
    ``.old`` copy when a write replacing it was killed between its two renames (that copy is the
    checkpoint: the new one never landed), also when something has since re-created a folder of
    the checkpoint's name without a checkpoint in it; else None."""
    checkpoint_dir = Path(checkpoint_dir)
    backup = backup_dir(checkpoint_dir)
    if checkpoint_dir.is_dir() and (_holds_checkpoint(checkpoint_dir) or not _holds_checkpoint(backup)):
        return checkpoint_dir
    if not _holds_checkpoint(backup):
        return None
    if backup not in _REPORTED_BACKUPS:
        _REPORTED_BACKUPS.add(backup)
        state = "holds no checkpoint" if checkpoint_dir.is_dir() else "is missing"
        print(f"checkpoint: {str(checkpoint_dir)!r} {state}; reading {backup.name}, the copy a save killed while "
              "replacing it left (the run's next save renames it back)", flush=True)
    return backup


def _set_aside(path: Path) -> Path:
    """Rename ``path`` to the first free ``<name>.incomplete[-N]``: kept for the user, never read or deleted."""
    aside = path.with_name(path.name + INCOMPLETE_SUFFIX)
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}{INCOMPLETE_SUFFIX}-{n}")
    os.replace(path, aside)
    return aside


def tidy_checkpoints_root(root) -> None:
    """Finish what a killed write or prune left in ``root``: a ``.old`` copy whose checkpoint is
    missing is renamed back (logged; a folder of the checkpoint's name that holds no checkpoint is
    first set aside as ``.incomplete``, not deleted); ``.tmp``, ``.deleting`` and other ``.old``
    folders are deleted."""
    root = Path(root)
    if not root.is_dir():
        return
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or not entry.name.endswith(TRANSIENT_SUFFIXES):
            continue
        if entry.name.endswith(OLD_SUFFIX):
            original = entry.with_name(entry.name[: -len(OLD_SUFFIX)])
            if _holds_checkpoint(entry) and not _holds_checkpoint(original):
                if original.exists():
                    aside = _set_aside(original)
                    print(f"checkpoint: {original.name} held no checkpoint (no {INFO}); moved it to {aside.name}",
                          flush=True)
                os.replace(entry, original)
                fsync_dir(root)
                _REPORTED_BACKUPS.discard(entry)
                print(f"checkpoint: restored {original.name} from {entry.name}, which a save killed while replacing "
                      "it left", flush=True)
                continue
        delete_dir(entry)


def write_pointer(output_dir, pointer_name: str, checkpoint_dir, extra: Optional[dict] = None) -> Path:
    output_dir = Path(output_dir)
    checkpoint_dir = Path(checkpoint_dir)
    if checkpoint_dir.name.endswith(OLD_SUFFIX):
        # A pointer names the checkpoint, never the copy a killed save left (renamed back by the next save).
        checkpoint_dir = checkpoint_dir.with_name(checkpoint_dir.name[: -len(OLD_SUFFIX)])
    rel = os.path.relpath(checkpoint_dir, output_dir)
    # A kill during an earlier write of this pointer left its temporary file (one process writes pointers).
    for stale in output_dir.glob(f".{pointer_name}.*{TMP_SUFFIX}"):
        stale.unlink()
    payload = {"path": rel}
    payload.update(extra or {})
    return atomic_write_json(output_dir / pointer_name, payload)


def read_pointer(output_dir, pointer_name: str) -> Optional[Path]:
    pointer = Path(output_dir) / pointer_name
    if not pointer.is_file():
        return None
    rel = json.loads(pointer.read_text())["path"]
    return usable_checkpoint_dir(Path(output_dir) / rel)


def selected_from_latest(output_dir) -> Optional[Path]:
    """The selected checkpoint as committed by the latest one (its info.json's ``selected_step``)."""
    latest = read_pointer(output_dir, LATEST_POINTER)
    if latest is None or not (latest / INFO).is_file():
        return None
    step = read_info(latest).get("selected_step")
    if step is None:
        return None
    wanted = Path(output_dir) / CHECKPOINTS_DIR / checkpoint_dir_name(step)
    selected = usable_checkpoint_dir(wanted)
    if selected is None:
        raise ValueError(f"the latest checkpoint {str(latest)!r} selects step {step}, but {str(wanted)!r} is missing")
    return selected


def resolve_checkpoint(path, prefer: str = SELECTED_POINTER) -> Path:
    """A checkpoint directory from either itself or a run's output directory.

    For an output directory the ``prefer`` pointer is followed (``selected.json`` by default, the
    checkpoint to evaluate, as recorded by the latest checkpoint; ``latest.json`` for resuming),
    falling back to the other pointer. A directory being written or deleted is refused by name.
    """
    path = Path(path)
    if path.name.endswith(TRANSIENT_SUFFIXES):
        raise ValueError(f"checkpoint: {str(path)!r} is a checkpoint being written or deleted ({path.suffix}), not a usable one")
    if (path / INFO).is_file():
        return path
    # The .old copy a killed save left, where ``path`` is missing or holds no checkpoint (a run's
    # output directory is returned as itself, and is resolved through its pointers below).
    backup = usable_checkpoint_dir(path)
    if backup is not None and backup != path:
        return backup
    trainer_checkpoint = find_trainer_checkpoint(path)   # a TRL / Trainer run (livr_model.app.trainer_runs)
    if trainer_checkpoint is not None:
        return trainer_checkpoint
    if prefer == SELECTED_POINTER:
        selected = selected_from_latest(path)
        if selected is not None:
            return selected
    for name in (prefer, LATEST_POINTER, SELECTED_POINTER):
        found = read_pointer(path, name)
        if found is not None:
            return found
    raise ValueError(
        f"checkpoint: {str(path)!r} is neither a checkpoint directory (no {INFO}) nor a run output "
        f"directory with {SELECTED_POINTER} or {LATEST_POINTER}"
    )


def list_checkpoints(output_dir) -> list:
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and (d / INFO).is_file() and not d.name.endswith(TRANSIENT_SUFFIXES)]
    return sorted(dirs, key=lambda d: json.loads((d / INFO).read_text())["global_step"])


def prune_checkpoints(output_dir, keep_last: int, protect=()) -> list:
    """Delete all but the newest ``keep_last`` checkpoints, never those in ``protect``."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1; got {keep_last}")
    protect = {Path(p).resolve() for p in protect if p is not None}
    root = Path(output_dir) / CHECKPOINTS_DIR
    leftovers = [d for d in root.iterdir() if d.name.endswith(DELETING_SUFFIX)] if root.is_dir() else []
    ckpts = list_checkpoints(output_dir)
    removed = []
    for d in ckpts[:-keep_last]:
        if d.resolve() in protect:
            continue
        # Out of the checkpoint's name first: a kill during rmtree leaves only a ".deleting" folder.
        doomed = d.with_name(d.name + DELETING_SUFFIX)
        os.replace(d, doomed)
        fsync_dir(d.parent)
        leftovers.append(doomed)
        removed.append(d)
    for doomed in leftovers:
        shutil.rmtree(doomed, ignore_errors=True)
    return removed


def require_complete(checkpoint_dir) -> Path:
    """``checkpoint_dir`` if it holds every file of a training checkpoint, else a ValueError naming it."""
    checkpoint_dir = Path(checkpoint_dir)
    missing = [name for name in REQUIRED_FILES if not (checkpoint_dir / name).is_file()]
    if missing:
        raise ValueError(f"checkpoint {str(checkpoint_dir)!r} is incomplete (missing {missing}); "
                         "it was damaged or partly deleted: use another checkpoint of the run")
    return checkpoint_dir


def claim_output_dir(cfg: TrainConfig, is_main: bool) -> None:
    """Refuse an output directory that holds another run unless ``resume`` (continue it) or
    ``overwrite`` (its run files are deleted here, by the main process); checkpoints of two runs
    must never mix."""
    output_dir = Path(cfg.output_dir)
    found = [name for name in RUN_ENTRIES if (output_dir / name).exists()]
    if not found or cfg.resume:
        return
    if not cfg.overwrite:
        raise ValueError(
            f"output_dir {str(output_dir)!r} holds another run ({', '.join(found)}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another --output-dir"
        )
    if is_main:
        for name in found:
            entry = output_dir / name
            if entry.is_dir():
                delete_dir(entry)
            else:
                entry.unlink()
        # What a killed --overwrite left half-deleted.
        for name in RUN_ENTRIES:
            leftover = output_dir / (name + DELETING_SUFFIX)
            if leftover.is_dir():
                delete_dir(leftover)


def read_info(checkpoint_dir) -> dict:
    return json.loads((Path(checkpoint_dir) / INFO).read_text())


def write_selected_pointer(output_dir) -> Optional[Path]:
    """selected.json rewritten from the latest checkpoint's record of the selected step."""
    selected = selected_from_latest(output_dir)
    if selected is not None:
        info = read_info(selected)
        write_pointer(output_dir, SELECTED_POINTER, selected,
                      {"global_step": info["global_step"], "val_accuracy": info.get("val_accuracy")})
    return selected
