"""Hostile layer tars: nothing outside the layer root is ever written, chmod-ed, chown-ed or removed.

Every test builds its archive with tarfile (or our own header writer), applies
it to ``base/root`` next to ``base/outside`` (a directory holding a canary
file), and checks both the outcome (a clear UnsafeArchiveError / ArchiveError,
or the entry contained inside the root) and that everything outside the root
is exactly as before: same files, contents, modes, owners, times, link counts.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from archivetools import build_tar, dir_, hard, needs_root, outside_state, reg, sym, ti
from thinpool.archive import ArchiveError, UnsafeArchiveError, apply_layer, export_changes, export_tree, changes
from thinpool.archive.tarformat import END_OF_ARCHIVE, encode_header

pytestmark = needs_root


class Jail:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "root"
        self.outside = base / "outside"
        self.root.mkdir()
        self.outside.mkdir()
        self.canary = self.outside / "canary"
        self.canary.write_text("canary")
        (self.outside / "sub").mkdir()
        os.chmod(self.outside / "sub", 0o750)
        self.before: dict[str, tuple] = {}

    def freeze(self) -> None:
        self.before = outside_state(self.base, self.root)

    def apply(self, data: bytes, **kw: object) -> int:
        self.freeze()
        return apply_layer(str(self.root), io.BytesIO(data), **kw)  # type: ignore[arg-type]

    def untouched(self) -> None:
        assert outside_state(self.base, self.root) == self.before
        assert self.canary.read_text() == "canary"


@pytest.fixture
def jail(tmp_path: Path) -> Iterator[Jail]:
    j = Jail(tmp_path)
    yield j
    j.untouched()  # checked again after every test, whatever it asserted


def _apply_fails(jail: Jail, data: bytes, match: str, error: type[Exception] = UnsafeArchiveError,
                 **kw: object) -> None:
    with pytest.raises(error, match=match):
        jail.apply(data, **kw)
    jail.untouched()


# -- names ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../outside/canary", "../evil", "a/../../evil", "./../evil", "..", "a/b/../../../x"])
def test_dotdot_names_are_refused(jail: Jail, name: str) -> None:
    _apply_fails(jail, build_tar(reg(name, b"pwned")), "outside the layer root")


@pytest.mark.parametrize("kind", ["dir", "symlink", "fifo", "char", "hardlink"])
def test_dotdot_refused_for_every_entry_type(jail: Jail, kind: str) -> None:
    name = "../outside/x"
    entry = {"dir": dir_(name), "symlink": sym(name, "/"), "fifo": ti(name, tarfile.FIFOTYPE),
             "char": ti(name, tarfile.CHRTYPE, devmajor=1, devminor=3), "hardlink": hard(name, "f")}[kind]
    _apply_fails(jail, build_tar(reg("f", b"1"), entry), "outside the layer root")


def test_pax_and_gnu_long_names_are_checked_too(jail: Jail) -> None:
    pax = encode_header("../" * 40 + "outside/evil", "0", mode=0o644) + END_OF_ARCHIVE  # PAX path record
    _apply_fails(jail, pax, "outside the layer root")
    gnu = build_tar(reg("../" * 40 + "evil", b"x"), fmt=tarfile.GNU_FORMAT)  # GNU 'L' long name
    _apply_fails(jail, gnu, "outside the layer root")


def test_absolute_names_stay_inside(jail: Jail) -> None:
    unique = f"thinpool-evil-{uuid.uuid4().hex}"
    jail.apply(build_tar(reg(f"/tmp/{unique}", b"inside"), reg(f"{jail.outside}/canary", b"pwned")))
    assert not os.path.exists(f"/tmp/{unique}")
    assert (jail.root / "tmp" / unique).read_bytes() == b"inside"
    assert (jail.root / str(jail.outside).lstrip("/") / "canary").read_bytes() == b"pwned"
    jail.untouched()


# -- symlinks -----------------------------------------------------------------------------------------

def test_entry_through_existing_absolute_symlink_is_contained(jail: Jail) -> None:
    (jail.root / "esc").symlink_to(jail.outside)
    jail.apply(build_tar(reg("esc/canary", b"pwned", mode=0o777), reg("esc/new", b"new"), dir_("esc/sub", mode=0o777)))
    inside = jail.root / str(jail.outside).lstrip("/")
    assert (inside / "canary").read_bytes() == b"pwned" and (inside / "new").read_bytes() == b"new"
    assert (jail.root / "esc").is_symlink()
    jail.untouched()


def test_entry_through_relative_escaping_symlink_is_contained(jail: Jail) -> None:
    (jail.root / "a").mkdir()
    (jail.root / "a/esc").symlink_to("../../../../../../../outside")
    jail.apply(build_tar(reg("a/esc/canary", b"pwned")))
    assert (jail.root / "outside/canary").read_bytes() == b"pwned"  # ".." stops at the root
    jail.untouched()


def test_symlink_from_the_same_layer_then_write_through_it(jail: Jail) -> None:
    jail.apply(build_tar(sym("link", str(jail.outside)), reg("link/canary", b"pwned"),
                         sym("rel", "../../../../outside"), reg("rel/canary", b"pwned too"),
                         sym("chain1", "chain2"), sym("chain2", str(jail.base)), reg("chain1/outside/canary", b"3")))
    assert (jail.root / str(jail.outside).lstrip("/") / "canary").read_bytes() == b"3"
    assert (jail.root / "outside/canary").read_bytes() == b"pwned too"
    jail.untouched()


def test_symlink_loop_is_refused(jail: Jail) -> None:
    _apply_fails(jail, build_tar(sym("a", "b"), sym("b", "a"), reg("a/x", b"x")), "too many levels of symlinks")


def test_regular_entry_replaces_a_symlink_instead_of_following_it(jail: Jail) -> None:
    (jail.root / "f").symlink_to(jail.canary)
    (jail.root / "d").symlink_to(jail.outside / "sub")
    jail.apply(build_tar(reg("f", b"pwned", mode=0o777, uid=1234), dir_("d", mode=0o777, uid=1234),
                         ti("n", tarfile.FIFOTYPE)))
    assert not (jail.root / "f").is_symlink() and (jail.root / "f").read_bytes() == b"pwned"
    assert (jail.root / "d").is_dir() and not (jail.root / "d").is_symlink()
    assert stat.S_IMODE(os.lstat(jail.root / "d").st_mode) == 0o777
    jail.untouched()


def test_metadata_of_a_symlink_entry_never_reaches_its_target(jail: Jail) -> None:
    jail.apply(build_tar(sym("s", str(jail.canary), uid=4321, gid=4321, mtime=1),
                         sym("t", str(jail.outside / "sub"), uid=4321,
                             pax={"SCHILY.xattr.trusted.x": "1"})))
    assert os.lstat(jail.root / "s").st_uid == 4321
    jail.untouched()


# -- hard links -------------------------------------------------------------------------------------

def test_hard_link_targets_outside_are_refused_or_contained(jail: Jail) -> None:
    _apply_fails(jail, build_tar(hard("h", "../outside/canary")), "target outside the layer root")
    _apply_fails(jail, build_tar(hard("h", "a/../../outside/canary")), "target outside the layer root")
    # absolute: resolved inside the root, where it does not exist
    _apply_fails(jail, build_tar(hard("h", str(jail.canary))), "does not exist", ArchiveError)
    assert os.lstat(jail.canary).st_nlink == 1


def test_hard_link_through_a_symlink_is_contained(jail: Jail) -> None:
    (jail.root / "esc").symlink_to(jail.outside)
    _apply_fails(jail, build_tar(hard("h", "esc/canary")), "does not exist", ArchiveError)
    _apply_fails(jail, build_tar(sym("in_layer", str(jail.outside)), hard("h2", "in_layer/canary")),
                 "does not exist", ArchiveError)
    (jail.root / "outside").mkdir()
    (jail.root / "outside/canary").write_text("inside")
    jail.apply(build_tar(sym("rel", "../../../outside"), hard("h3", "rel/canary")))
    assert os.path.samefile(jail.root / "h3", jail.root / "outside/canary")
    jail.untouched()


def test_hard_link_to_an_escaping_symlink_links_the_symlink_itself(jail: Jail) -> None:
    jail.apply(build_tar(sym("s", str(jail.canary)), hard("h", "s", mode=0o777, uid=999),
                         reg("h", b"rewritten")))
    assert os.readlink(jail.root / "s") == str(jail.canary)
    assert (jail.root / "h").read_bytes() == b"rewritten"
    jail.untouched()


def test_hard_link_to_a_directory_is_refused(jail: Jail) -> None:
    _apply_fails(jail, build_tar(dir_("d"), hard("h", "d")), "is a directory", ArchiveError)


# -- whiteouts -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [".wh.", ".wh..", ".wh...", "a/.wh..", "a/.wh..."])
def test_whiteout_of_dot_and_dotdot_is_refused(jail: Jail, name: str) -> None:
    (jail.root / "a").mkdir()
    (jail.root / "a/keep").write_text("k")
    _apply_fails(jail, build_tar(reg(name)), "invalid whiteout")
    assert (jail.root / "a/keep").exists()


@pytest.mark.parametrize("whiteouts", ["delete", "overlay"])
def test_whiteouts_through_symlinks_stay_inside(jail: Jail, whiteouts: str) -> None:
    (jail.root / "esc").symlink_to(jail.outside)
    (jail.root / "rel").symlink_to("../outside")
    jail.apply(build_tar(reg("esc/.wh.canary"), reg("rel/.wh.sub"), reg("esc/.wh..wh..opq"),
                         reg("rel/.wh..wh..opq"), reg(".wh.esc")), whiteouts=whiteouts)
    assert not (jail.root / "esc").is_symlink()  # removed (a 0:0 char device in overlay format)
    assert (jail.root / "rel").is_symlink()
    jail.untouched()


def test_opaque_root_marker_empties_only_the_root(jail: Jail) -> None:
    (jail.root / "old").write_text("old")
    (jail.root / "esc").symlink_to(jail.outside)
    jail.apply(build_tar(reg("new", b"n"), reg(".wh..wh..opq")))
    assert sorted(os.listdir(jail.root)) == ["new"]
    jail.untouched()


def test_aufs_plnk_cannot_reach_outside(jail: Jail) -> None:
    _apply_fails(jail, build_tar(reg(".wh..wh.plnk/../../outside/canary", b"pwned")), "outside the layer root")
    jail.apply(build_tar(reg(".wh..wh.plnk/x", b"data"), hard("l", ".wh..wh.plnk/x")))
    assert os.listdir(jail.root) == ["l"]
    jail.untouched()


def test_failed_apply_leaves_no_stray_files(jail: Jail) -> None:
    data = build_tar(reg("ok", b"1"), reg(".wh..wh.plnk/tmp", b"t"), reg("../bad", b"x"))
    _apply_fails(jail, data, "outside the layer root")
    assert os.listdir(jail.root) == ["ok"]


# -- reading trees with hostile contents --------------------------------------------------------------

def test_changes_and_export_never_follow_links(jail: Jail) -> None:
    (jail.root / "esc").symlink_to(jail.outside)
    (jail.root / "d").mkdir()
    (jail.root / "d/f").write_text("f")
    jail.freeze()
    ch = changes(str(jail.root), None)
    assert [c.path for c in ch] == ["/d", "/d/f", "/esc"]
    full = b"".join(export_tree(str(jail.root)))
    with tarfile.open(fileobj=io.BytesIO(full)) as tf:
        assert tf.getnames() == ["d", "d/f", "esc"] and tf.getmember("esc").issym()
    with pytest.raises(ArchiveError, match="symlink where a directory was expected"):
        b"".join(export_changes(str(jail.root), [c.__class__("/esc/canary", c.kind) for c in ch[:1]]))
    jail.untouched()
