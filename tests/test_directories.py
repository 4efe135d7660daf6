"""Where a pruned model is written: the one output guard, the atomic publish, stray temporaries, file modes."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from tiny_models import build, tiny_tokenizer

from optimum_statprune import StatPruneConfig, StatPruner
from optimum_statprune.checkpoint import atomic, directories
from optimum_statprune.checkpoint.directories import OutputDirError, check_output, publish
from optimum_statprune.sharing.manifest import MANIFEST_NAME, write_manifest

MAGNITUDE = StatPruneConfig(method="magnitude")


@pytest.fixture
def checkpoint(tmp_path):
    src = tmp_path / "models" / "src"
    build("llama").save_pretrained(src, max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(src)
    return src


def _pruner(checkpoint) -> StatPruner:
    return StatPruner.from_pretrained(checkpoint, config=MAGNITUDE, device="cpu")


def _listing(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["model", "ancestor", "cwd", "home", "root"])
def test_guard_refuses_the_model_its_ancestors_cwd_home_and_root_even_with_overwrite(checkpoint, tmp_path, monkeypatch, where):
    """Each is refused before any work, with one line saying which, for both ways of writing a model; the
    model directory and everything around it are untouched (the old in-memory save renamed the model's
    parent directory away and deleted it)."""
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    target = {"model": checkpoint, "ancestor": checkpoint.parent.parent, "cwd": Path("."), "home": Path("~"),
              "root": Path("/")}[where]
    before = _listing(tmp_path)
    pruner = _pruner(checkpoint)
    with pytest.raises(OutputDirError) as streamed:
        pruner.prune(output_dir=target, overwrite=True)
    with pytest.raises(OutputDirError) as saved:
        pruner.save_pretrained(target, overwrite=True)
    expected = {"model": "is the model being pruned", "ancestor": "a directory holding the model"}.get(
        where, "the filesystem root, the home directory or the current directory")
    for e in (streamed, saved):
        assert expected in str(e.value) and "\n" not in str(e.value)
    assert _listing(tmp_path) == before
    assert pruner._model is None  # refused before the weights were loaded


def test_guard_refuses_non_empty_unwritable_parent_and_mount_point(checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"not empty.*overwrite \(--overwrite\)"):
        check_output(out, overwrite=False)
    # an existing, writable output under a parent that cannot be written: the final rename would fail
    real_access = os.access
    monkeypatch.setattr(directories.os, "access", lambda p, mode: Path(p) != tmp_path and real_access(p, mode))
    with pytest.raises(OutputDirError, match=f"{tmp_path} is not writable"):
        check_output(out, overwrite=True)
    monkeypatch.undo()
    # a mount point cannot be renamed away: refused up front, its files kept
    monkeypatch.setattr(directories.os.path, "ismount", lambda p: Path(p) == out)
    with pytest.raises(OutputDirError, match="mount point.*inside it"):
        _pruner(checkpoint).prune(output_dir=out, overwrite=True)
    assert (out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("how", ["stream", "save"])
def test_symlinked_output_is_published_at_its_target(checkpoint, tmp_path, how):
    """A symlink to an existing model directory: the new model replaces the target, the link stays a link,
    the user's other files beside the link survive (the old code failed after all the work with "Cannot
    call rmtree on a symbolic link")."""
    target = tmp_path / "volume" / "old-model"
    target.mkdir(parents=True)
    (target / "stale.bin").write_text("old")
    links = tmp_path / "links"
    links.mkdir()
    (links / "notes.txt").write_text("mine")
    link = links / "pruned"
    link.symlink_to(target, target_is_directory=True)
    pruner = _pruner(checkpoint)
    if how == "stream":
        pruner.prune(output_dir=link, overwrite=True, progress=False)
    else:
        pruner.prune(progress=False)
        pruner.save_pretrained(link, overwrite=True)
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert (target / MANIFEST_NAME).is_file() and not (target / "stale.bin").exists()
    assert (links / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in target.parent.iterdir()) == ["old-model"]  # nothing left beside it


def _model_dir(path: Path, tag: str) -> dict[str, bytes]:
    path.mkdir()
    for i in range(3):
        (path / f"part-{i}").write_text(f"{tag}-{i}")
    (path / "sub").mkdir()
    (path / "sub" / "x").write_text(tag)
    return _listing(path)


_STEPS = ["exchange", "replace-1", "replace-2", "rmtree-1"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
@pytest.mark.parametrize("step", _STEPS)
def test_publish_leaves_the_complete_old_or_new_model_after_a_failure_at_any_step(tmp_path, monkeypatch, exchange, step):
    """A fault at each step of the swap: afterwards (and after the next run's recovery) the output holds
    the complete old or the complete new model, nothing else, and no aside copy is left to be published."""
    old = _model_dir(tmp_path / "out", "old")
    new = _model_dir(tmp_path / ".out.partial", "new")
    counts: dict[str, int] = {}

    def failing(name, real):
        def call(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            if f"{name}-{counts[name]}" == step or name == step:
                raise OSError(5, f"injected fault at {step}")
            return real(*args, **kwargs)
        return call

    if exchange:
        if directories._renameat2 is None:
            pytest.skip("no renameat2 here")
        monkeypatch.setattr(directories, "_exchange", failing("exchange", directories._exchange))
    else:
        monkeypatch.setattr(directories, "_exchange", lambda a, b: False)
    monkeypatch.setattr(directories.os, "replace", failing("replace", os.replace))
    monkeypatch.setattr(directories.shutil, "rmtree", failing("rmtree", shutil.rmtree))
    out = tmp_path / "out"
    try:
        publish(tmp_path / ".out.partial", out)
    except OSError as e:
        assert "injected" in str(e)
    assert _listing(out) in (old, new)
    monkeypatch.undo()
    directories.recover(out)
    assert _listing(out) in (old, new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no aside copy, no stateless partial


def test_a_swap_killed_between_its_renames_is_restored_not_published(tmp_path):
    """Where the two-rename fallback was killed after moving the old output aside, the next run puts it
    back; a leftover aside copy next to a complete output is deleted."""
    old = _model_dir(tmp_path / ".out.old", "old")
    directories.recover(tmp_path / "out")
    assert _listing(tmp_path / "out") == old and not (tmp_path / ".out.old").exists()
    _model_dir(tmp_path / ".out.old", "older")
    check_output(tmp_path / "out", overwrite=True)
    assert _listing(tmp_path / "out") == old and not (tmp_path / ".out.old").exists()


def test_stale_temporaries_of_the_same_output_are_removed_and_none_are_made_inside_it(checkpoint, tmp_path, monkeypatch):
    """A killed in-memory save leaves a full-size ``.out.tmp-XXXX`` sibling, a killed manifest update a temp
    file: the next run of that output removes them (ours by name), other outputs' are kept. Rewriting the
    manifest of a published model makes its temp file beside the directory, never inside it."""
    out = tmp_path / "out"
    (tmp_path / ".out.tmp-abc123").mkdir()
    (tmp_path / ".out.tmp-abc123" / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / ".out.tmp-file1").write_text("{")
    (tmp_path / ".other.tmp-keep").mkdir()
    pruner = _pruner(checkpoint)
    pruner.prune(progress=False)
    pruner.save_pretrained(out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".other.tmp-keep"]

    before = _listing(out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    real_replace = os.replace

    def killed(src, dst):  # the rename never happens, as when killed just before it
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_manifest(out, {**manifest, "evaluation": {}})
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert _listing(out) == before  # nothing half-written inside the published model
    assert [p.name[:9] for p in tmp_path.glob(".out.tmp-*")] == [".out.tmp-"]  # the stray is beside it
    check_output(out, overwrite=True)  # the next run of this output
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_written_files_follow_the_umask(checkpoint, tmp_path, monkeypatch):
    """Index, manifest and statprune_config.json were created 0600 (mkstemp) and the in-memory save's
    directory 0700 (mkdtemp); everything now has the mode the umask gives, as save_pretrained's files do."""
    monkeypatch.setattr(atomic, "_umask", None)
    previous = os.umask(0o027)
    try:
        pruner = _pruner(checkpoint)
        pruner.prune(output_dir=tmp_path / "streamed", progress=False)
        pruner.save_pretrained(tmp_path / "saved")
    finally:
        os.umask(previous)
        atomic._umask = None
    for out in (tmp_path / "streamed", tmp_path / "saved"):
        assert stat.S_IMODE(out.stat().st_mode) == 0o750, out
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
        assert set(modes.values()) == {0o640}, modes


def test_cli_refuses_a_directory_holding_the_model_in_one_line(checkpoint, capsys):
    """``--output`` above ``--model`` with ``--overwrite``: the old check compared only the model directory
    itself, so the run went ahead and the replacement deleted the model; now exit 2 with one line."""
    from optimum_statprune import cli

    before = _listing(checkpoint.parent)
    code = cli.main(["prune", "--model", str(checkpoint), "--output", str(checkpoint.parent), "--overwrite",
                     "--method", "magnitude", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "a directory holding the model" in err
    assert "Traceback" not in err and _listing(checkpoint.parent) == before
