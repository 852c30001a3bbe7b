"""`lsv data prepare voxceleb` on a tree reached through symbolic links, as on clusters where ``voxceleb1/`` and
``voxceleb2/`` inside the root are links to shared storage: the links are followed, and ``wav.scp`` keeps the
paths through them (not the resolved physical ones), so another mount of the same data reads the same lists."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lsv_core.data.manifest import read_kaldi_dir
from lsv_core.data.trials import read_trials
from search.cli import main
from tests.test_voxceleb import vox_root  # noqa: F401  (the fixture: a small VoxCeleb-like tree)


@pytest.fixture
def linked_root(vox_root: Path, tmp_path: Path) -> Path:  # noqa: F811
    """``root/voxceleb1`` and ``root/voxceleb2`` are links into the downloads; the trial list is a file link."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "voxceleb1").symlink_to(vox_root / "vox1_dev_wav", target_is_directory=True)
    (root / "voxceleb2").mkdir()
    (root / "voxceleb2" / "dev").symlink_to(vox_root / "vox2_dev_aac", target_is_directory=True)
    (root / "voxceleb2" / "test").symlink_to(vox_root / "vox2_test_aac", target_is_directory=True)
    (root / "veri_test2.txt").symlink_to(vox_root / "veri_test2.txt")
    (vox_root / "vox1_dev_wav" / "wav" / "loop").symlink_to(root, target_is_directory=True)  # a cycle
    return root


def test_symlinked_folders_are_followed_and_kept_in_the_paths(linked_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    assert main(["data", "prepare", "voxceleb", "--root", str(linked_root), "--out", str(out)]) == 0
    vox1, dev, test = (read_kaldi_dir(out / n) for n in ("vox1", "vox2_dev", "vox2_test"))
    assert (len(vox1), len(dev), len(test)) == (12, 6, 1)  # nothing walked twice through the cycle
    for data, link in ((vox1, "voxceleb1"), (dev, "voxceleb2/dev"), (test, "voxceleb2/test")):
        for u in data:
            assert str(u.path).startswith(str(linked_root / link) + os.sep), u.path
    assert len(read_trials(out / "vox1" / "vox1_O_cleaned.kaldi", vox1)) == 3
    # Another node's view: the same data behind the link, on another "mount" (a copy elsewhere).
    copy = shutil.copytree(linked_root / "voxceleb1", tmp_path / "other_mount", symlinks=True)
    (linked_root / "voxceleb1").unlink()
    (linked_root / "voxceleb1").symlink_to(copy, target_is_directory=True)
    shutil.rmtree(tmp_path / "downloads" / "vox1_dev_wav")
    assert all(u.path.is_file() for u in read_kaldi_dir(out / "vox1"))


def test_a_relative_root_gives_absolute_unresolved_paths(linked_root: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["data", "prepare", "voxceleb", "--root", "root", "--out", "prepared"]) == 0
    vox1 = read_kaldi_dir(tmp_path / "prepared" / "vox1")
    assert all(u.path.is_absolute() and u.path.is_file() for u in vox1)
    assert all(str(u.path).startswith(str(tmp_path / "root" / "voxceleb1")) for u in vox1)
