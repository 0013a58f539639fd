"""A kill at any point of a checkpoint write leaves a checkpoint that the loaders find: the new one
once its rename has landed, the old one before; what the kill left is tidied by the next write."""
import json
import os
import shutil
from pathlib import Path

import pytest

from livr_model.app import checkpoints as ckpt
from livr_model.app import state as state_module
from livr_model.app.models import load_trained, read_run_config
from livr_model.app.train import train
from test_train import tiny_config, tiny_data, tiny_setup

MARKER = "marker.txt"
STEP = 5


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, not even ``except Exception`` blocks."""


class KillAt:
    """Counts the renames and tree deletions a write makes; kills at number ``at``, before or after doing it."""

    def __init__(self, monkeypatch, at=None, after=False):
        self.at, self.after, self.count = at, after, 0
        real_replace, real_rmtree = os.replace, shutil.rmtree
        monkeypatch.setattr(ckpt.os, "replace", lambda *a, **k: self._event(real_replace, *a, **k))
        monkeypatch.setattr(ckpt.shutil, "rmtree", lambda *a, **k: self._event(real_rmtree, *a, **k))

    def _event(self, real, *args, **kwargs):
        self.count += 1
        if self.count == self.at and not self.after:
            raise Killed(f"killed before event {self.at}")
        result = real(*args, **kwargs)
        if self.count == self.at:
            raise Killed(f"killed after event {self.at}")
        return result


def small_checkpoint(output_dir, step, text, selected_step=None):
    final = Path(output_dir) / ckpt.CHECKPOINTS_DIR / ckpt.checkpoint_dir_name(step)
    info = {"global_step": step, "selected_step": step if selected_step is None else selected_step}
    return ckpt.write_checkpoint_dir(final, {ckpt.INFO: json.dumps(info), MARKER: text})


def count_events(tmp_path, monkeypatch):
    """How many renames and deletions replacing a checkpoint takes (whatever the implementation)."""
    scratch = tmp_path / "count"
    small_checkpoint(scratch, STEP, "old")
    with monkeypatch.context() as patch:
        counter = KillAt(patch)
        small_checkpoint(scratch, STEP, "new")
    shutil.rmtree(scratch)
    return counter.count


def killed_between_the_renames(monkeypatch, final, write):
    """Run ``write``, a replacement of ``final``, killed after the old directory went aside and
    before the new one came in."""
    real_replace = os.replace

    def replace(src, dst):
        if str(src).endswith(ckpt.TMP_SUFFIX) and Path(dst) == Path(final):
            raise Killed("killed between the renames")
        return real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(ckpt.os, "replace", replace)
        with pytest.raises(Killed):
            write()
    assert not Path(final).exists(), "the kill fell between the two renames"


def test_a_kill_at_every_rename_or_deletion_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    events = count_events(tmp_path, monkeypatch)
    assert events >= 2, "replacing a checkpoint renames the old one aside and the new one in"
    for at in range(1, events + 1):
        for after in (False, True):
            out = tmp_path / f"run-{at}-{after}"
            final = small_checkpoint(out, STEP, "old")
            ckpt.write_pointer(out, ckpt.LATEST_POINTER, final)
            ckpt.write_selected_pointer(out)
            with monkeypatch.context() as patch:
                KillAt(patch, at, after)
                with pytest.raises(Killed):
                    small_checkpoint(out, STEP, "new")
            landed = (final / MARKER).is_file() and (final / MARKER).read_text() == "new"
            want = "new" if landed else "old"
            where = f"killed {'after' if after else 'before'} event {at} of {events}"
            for found in (ckpt.resolve_checkpoint(out), ckpt.resolve_checkpoint(out, ckpt.LATEST_POINTER),
                          ckpt.resolve_checkpoint(final), ckpt.read_pointer(out, ckpt.LATEST_POINTER)):
                assert found is not None and (found / MARKER).read_text() == want, where
            # the next write of another step restores the name and removes every leftover
            newer = small_checkpoint(out, STEP + 1, "newer", selected_step=STEP)
            ckpt.write_pointer(out, ckpt.LATEST_POINTER, newer)
            assert sorted(p.name for p in (out / ckpt.CHECKPOINTS_DIR).iterdir()) == [final.name, newer.name], where
            assert (final / MARKER).read_text() == want, where
            assert ckpt.resolve_checkpoint(out) == final, where


def test_a_restore_is_logged_in_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path
    final = small_checkpoint(out, STEP, "old")
    ckpt.write_pointer(out, ckpt.LATEST_POINTER, final)
    killed_between_the_renames(monkeypatch, final, lambda: small_checkpoint(out, STEP, "new"))
    capsys.readouterr()
    assert (ckpt.resolve_checkpoint(out) / MARKER).read_text() == "old"
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and final.name in lines[0] and ckpt.OLD_SUFFIX in lines[0], lines
    assert not final.exists(), "reading renames nothing (a read-only run directory loads too)"
    small_checkpoint(out, STEP + 1, "newer")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "restored" in lines[0] and final.name in lines[0], lines
    assert (final / MARKER).read_text() == "old"


def test_the_selected_checkpoint_is_found_after_a_killed_replace(tmp_path, monkeypatch):
    best = small_checkpoint(tmp_path, STEP, "best")
    latest = small_checkpoint(tmp_path, STEP + 1, "later", selected_step=STEP)
    ckpt.write_pointer(tmp_path, ckpt.LATEST_POINTER, latest)
    killed_between_the_renames(monkeypatch, best, lambda: small_checkpoint(tmp_path, STEP, "rewritten"))
    assert (ckpt.resolve_checkpoint(tmp_path) / MARKER).read_text() == "best"
    # selected.json names the checkpoint, never its backup
    ckpt.write_selected_pointer(tmp_path)
    assert json.loads((tmp_path / ckpt.SELECTED_POINTER).read_text())["path"] == os.path.join(ckpt.CHECKPOINTS_DIR, best.name)


def test_no_partly_deleted_backup_keeps_the_backup_name(tmp_path, monkeypatch):
    """The fallback trusts a ``.old`` folder to be whole: its deletion must not happen under that name."""
    final = small_checkpoint(tmp_path, STEP, "old")
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        path = Path(path)
        if (path / MARKER).is_file() and (path / MARKER).read_text() == "old":
            (path / ckpt.INFO).unlink()
            raise Killed("killed while deleting the old copy")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_midway)
    with pytest.raises(Killed):
        small_checkpoint(tmp_path, STEP, "new")
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    backup = final.with_name(final.name + ckpt.OLD_SUFFIX)
    assert not backup.exists(), "a half-deleted copy kept the name the loaders fall back to"
    assert (final / MARKER).read_text() == "new"


def test_overwrite_after_a_killed_overwrite(tmp_path, monkeypatch):
    out = tmp_path / "run"
    small_checkpoint(out, STEP, "first run")
    cfg = tiny_config(out, overwrite=True)
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        raise Killed("killed while deleting the previous run")

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_midway)
    with pytest.raises(Killed):
        ckpt.claim_output_dir(cfg, is_main=True)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    small_checkpoint(out, STEP, "second run")
    ckpt.claim_output_dir(cfg, is_main=True)
    assert sorted(p.name for p in out.iterdir()) == []


def run(out, **overrides):
    model, processor = tiny_setup()
    train_examples, val_examples = tiny_data()
    return train(tiny_config(out, **overrides), model=model, processor=processor,
                 train_examples=train_examples, val_examples=val_examples)


def test_real_loaders_after_a_kill_while_replacing_the_latest_checkpoint(tmp_path, monkeypatch, capsys):
    """Resume, reload for evaluation and ``livr-eval --checkpoint`` (its run config) all use the copy
    a kill between the two renames left; the resumed run's first save restores the name."""
    out = tmp_path
    run(out, max_steps=1)
    latest = ckpt.read_pointer(out, ckpt.LATEST_POINTER)
    files = {p.name: p.read_bytes() for p in latest.iterdir()}
    killed_between_the_renames(monkeypatch, latest, lambda: ckpt.write_checkpoint_dir(latest, files))
    for path in (out, latest):
        assert read_run_config(path).output_dir == str(out)
        model, processor = tiny_setup()
        ckpt.require_complete(load_trained(path, model=model, processor=processor).checkpoint_dir)
    capsys.readouterr()
    resumed = run(out, max_steps=2, resume=True)
    printed = capsys.readouterr().out
    assert "starting a new run" not in printed and "resuming from" in printed, printed
    assert resumed.state.global_step == 2
    assert sorted(p.name for p in (out / ckpt.CHECKPOINTS_DIR).iterdir()) == [
        ckpt.checkpoint_dir_name(1), ckpt.checkpoint_dir_name(2)]


def test_a_pointer_write_removes_the_temporary_file_a_killed_one_left(tmp_path):
    final = small_checkpoint(tmp_path, STEP, "old")
    ckpt.write_pointer(tmp_path, ckpt.LATEST_POINTER, final)
    # what SIGKILL leaves mid-write: atomic_write_bytes's cleanup never runs
    stale = tmp_path / f".{ckpt.LATEST_POINTER}.k1ll3d{ckpt.TMP_SUFFIX}"
    stale.write_text('{"path": "checkpoints/step-0000')
    other = tmp_path / f".{ckpt.SELECTED_POINTER}.k1ll3d{ckpt.TMP_SUFFIX}"
    other.write_text("{")
    ckpt.write_pointer(tmp_path, ckpt.LATEST_POINTER, final)
    assert not stale.exists() and other.exists(), "only the written pointer's own leftovers go"
    assert ckpt.read_pointer(tmp_path, ckpt.LATEST_POINTER) == final


def test_a_kill_while_a_resumed_run_rewrites_an_uncommitted_checkpoint(tmp_path, monkeypatch):
    """The window livr-train itself meets: a save whose latest.json write was killed leaves step 2
    uncommitted; the resumed run saves step 2 again and is killed between the renames. latest.json
    still names step 1, so the next resume continues from there and nothing is left behind."""
    real_write_pointer = ckpt.write_pointer

    def killed_before_latest(output_dir, name, checkpoint_dir, *args, **kwargs):
        if name == ckpt.LATEST_POINTER and Path(checkpoint_dir).name == ckpt.checkpoint_dir_name(2):
            raise Killed("killed before latest.json named step 2")
        return real_write_pointer(output_dir, name, checkpoint_dir, *args, **kwargs)

    monkeypatch.setattr(state_module, "write_pointer", killed_before_latest)
    with pytest.raises(Killed):
        run(tmp_path, max_steps=2, save_steps=1)
    monkeypatch.setattr(state_module, "write_pointer", real_write_pointer)
    uncommitted = tmp_path / ckpt.CHECKPOINTS_DIR / ckpt.checkpoint_dir_name(2)
    assert uncommitted.is_dir() and ckpt.read_info(ckpt.read_pointer(tmp_path, ckpt.LATEST_POINTER))["global_step"] == 1
    killed_between_the_renames(monkeypatch, uncommitted, lambda: run(tmp_path, max_steps=2, save_steps=1, resume=True))
    assert ckpt.read_info(ckpt.read_pointer(tmp_path, ckpt.LATEST_POINTER))["global_step"] == 1
    resumed = run(tmp_path, max_steps=3, save_steps=1, resume=True, keep_checkpoints=5)
    assert resumed.state.global_step == 3
    assert sorted(p.name for p in (tmp_path / ckpt.CHECKPOINTS_DIR).iterdir()) == [
        ckpt.checkpoint_dir_name(step) for step in (1, 2, 3)]


def test_resume_refuses_a_latest_pointer_to_a_missing_checkpoint(tmp_path, capsys):
    """With no copy to fall back to, --resume says what is missing instead of starting the run over."""
    run(tmp_path, max_steps=1)
    latest = ckpt.read_pointer(tmp_path, ckpt.LATEST_POINTER)
    shutil.rmtree(latest)
    with pytest.raises(ValueError, match=rf"latest.json' names '{ckpt.CHECKPOINTS_DIR}/{latest.name}', which is missing"):
        run(tmp_path, max_steps=2, resume=True)
    assert not (tmp_path / ckpt.CHECKPOINTS_DIR / ckpt.checkpoint_dir_name(2)).exists()


def test_livr_eval_of_a_checkpoint_a_kill_left_as_its_copy_keeps_the_name_free(tmp_path, monkeypatch, capsys):
    """``livr-eval --checkpoint <run>/checkpoints/step-N``, step-N living only as its ``.old`` copy:
    the default output folder (``<checkpoint>/eval``) made step-N again, holding nothing but eval/.
    Every loader then took that folder for the checkpoint (resume refused it as incomplete) and the
    next save's tidy deleted the copy, the only one left. The metrics go into the copy read."""
    from livr_model.app.cli import eval_main, train_main
    from livr_model.app.tiny import build_tiny_model, build_tiny_processor, save_tiny

    processor = build_tiny_processor(56)
    save_tiny(build_tiny_model(processor, text_hidden=64, vision_hidden=32, vision_depth=1), processor, tmp_path / "base")
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    out = tmp_path / "run"
    assert train_main(["--config", "examples/tiny_counting.yaml", "--model", str(tmp_path / "base"),
                       "--output-dir", str(out), "--max-steps", "1", "--no-progress"]) == 0
    latest = ckpt.read_pointer(out, ckpt.LATEST_POINTER)
    files = {p.name: p.read_bytes() for p in latest.iterdir() if p.is_file()}
    killed_between_the_renames(monkeypatch, latest, lambda: ckpt.write_checkpoint_dir(latest, files))
    argv = ["--checkpoint", str(latest), "--method", "likelihood", "--no-probes", "--limit", "2"]
    assert eval_main(argv) == 0
    assert not latest.exists(), "livr-eval made the missing checkpoint's name again"
    assert (ckpt.backup_dir(latest) / "eval" / "metrics.json").is_file()
    assert ckpt.read_pointer(out, ckpt.LATEST_POINTER) == ckpt.backup_dir(latest)
    ckpt.require_complete(ckpt.read_pointer(out, ckpt.LATEST_POINTER))


def test_a_folder_recreated_under_the_name_of_a_checkpoint_left_as_its_copy(tmp_path, capsys):
    """After a kill between the renames, anything that re-creates ``step-N/`` without a checkpoint
    (an eval folder written into it by hand, say) neither hides the ``.old`` copy from the loaders
    nor gets it deleted by the next save: the stray folder is set aside, the copy renamed back."""
    final = small_checkpoint(tmp_path, STEP, "kept")
    os.replace(final, ckpt.backup_dir(final))
    (final / "eval").mkdir(parents=True)
    (final / "eval" / "metrics.json").write_text("{}")
    got = ckpt.usable_checkpoint_dir(final)
    assert got == ckpt.backup_dir(final) and (got / MARKER).read_text() == "kept"
    assert ckpt.resolve_checkpoint(final) == got, "the step's own path leads to its copy too"
    assert "holds no checkpoint" in capsys.readouterr().out
    small_checkpoint(tmp_path, STEP + 1, "next")  # the next save tidies the folder
    root = final.parent
    assert (final / MARKER).read_text() == "kept" and not ckpt.backup_dir(final).exists()
    aside = root / (final.name + ckpt.INCOMPLETE_SUFFIX)
    assert (aside / "eval" / "metrics.json").is_file(), "the stray folder is kept for the user"
    assert [d.name for d in ckpt.list_checkpoints(tmp_path)] == [final.name, ckpt.checkpoint_dir_name(STEP + 1)]
    assert "moved it to" in capsys.readouterr().out
