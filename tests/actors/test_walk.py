"""The path-walk rules and the node table, with no daemon: an in-memory tree answers what
the walk asks for, and the host's own path lookup (on the same tree made in a temporary
folder) is the reference for what it resolves to."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirtiofs.actors.nodes import NodeTable
from pyvirtiofs.actors.permissions import Cred
from pyvirtiofs.actors.walk import (
    CREATE,
    PARENT,
    ROOT_NAME,
    NeedAttr,
    NeedLookup,
    NeedReadlink,
    Resolved,
    Walk,
    split_path,
)
from pyvirtiofs.codec.fuse_types import Attr, EntryOut

ROOT = 1


@dataclass
class Entry:
    mode: int
    children: dict[bytes, int] = field(default_factory=dict)
    target: bytes = b""
    uid: int = 0


class Tree:
    """An in-memory namespace that answers LOOKUP, READLINK and GETATTR, and counts them."""

    def __init__(self) -> None:
        self.entries: dict[int, Entry] = {ROOT: Entry(stat.S_IFDIR | 0o755)}
        self.requests: list[tuple[str, int]] = []

    def add(self, parent: int, name: bytes, mode: int, target: bytes = b"",
            uid: int = 0) -> int:
        nodeid = max(self.entries) + 1
        self.entries[nodeid] = Entry(mode, target=target, uid=uid)
        self.entries[parent].children[name] = nodeid
        return nodeid

    def attr(self, nodeid: int) -> Attr:
        e = self.entries[nodeid]
        return Attr(ino=nodeid, size=0, blocks=0, atime=0, mtime=0, ctime=0, atimensec=0,
                    mtimensec=0, ctimensec=0, mode=e.mode, nlink=1, uid=e.uid, gid=0,
                    rdev=0, blksize=4096, flags=0)

    def entry(self, nodeid: int, ttl: int = 1) -> EntryOut:
        return EntryOut(nodeid=nodeid, generation=0, entry_valid=ttl, entry_valid_nsec=0,
                        attr_valid=ttl, attr_valid_nsec=0, attr=self.attr(nodeid))


def drive(table: NodeTable, tree: Tree, walk: Walk, ttl: int = 1) -> Resolved:
    """Run a walk to its end against ``tree`` (what the session does with the daemon)."""
    try:
        while True:
            need = walk.step()
            if isinstance(need, Resolved):
                return need
            if isinstance(need, NeedLookup):
                tree.requests.append(("lookup", need.parent))
                child = tree.entries[need.parent].children.get(need.name)
                walk.found(None if child is None else
                           table.learn(need.parent, need.name, tree.entry(child, ttl)))
            elif isinstance(need, NeedReadlink):
                tree.requests.append(("readlink", need.nodeid))
                walk.link_target(tree.entries[need.nodeid].target)
            elif isinstance(need, NeedAttr):
                tree.requests.append(("getattr", need.nodeid))
                node = table.get(need.nodeid)
                assert node is not None, "the walk waits on a node the table forgot"
                table.set_attr(node, tree.attr(need.nodeid), ttl, 0)
                walk.resume()
    finally:
        walk.release()


def walk_of(table: NodeTable, path: bytes, **kwargs: object) -> Walk:
    parts, trailing = split_path(path)
    root = table.node(ROOT)
    return Walk(table, root, parts, trailing=trailing, **kwargs)  # type: ignore[arg-type]


def resolve(table: NodeTable, tree: Tree, path: bytes, **kwargs: object) -> Resolved | int:
    """The outcome, or the errno."""
    try:
        return drive(table, tree, walk_of(table, path, **kwargs))
    except OSError as exc:
        assert exc.errno is not None
        return exc.errno


@pytest.fixture
def world() -> tuple[NodeTable, Tree, dict[str, int]]:
    """ /d/ (dir), /d/f (file), /d/sub/ (dir), /lf -> d/f, /ld -> d, /abs -> /d/sub,
    /loop -> loop, /dangling -> nope, /empty -> "" , /deep -> ld/sub"""
    tree = Tree()
    ids = {"d": tree.add(ROOT, b"d", stat.S_IFDIR | 0o755)}
    ids["f"] = tree.add(ids["d"], b"f", stat.S_IFREG | 0o644)
    ids["sub"] = tree.add(ids["d"], b"sub", stat.S_IFDIR | 0o755)
    for name, target in [("lf", b"d/f"), ("ld", b"d"), ("abs", b"/d/sub"), ("loop", b"loop"),
                         ("dangling", b"nope"), ("empty", b""), ("deep", b"ld/sub"),
                         ("slashdir", b"d/"), ("slashfile", b"d/f/")]:
        ids[name] = tree.add(ROOT, name.encode(), stat.S_IFLNK | 0o777, target)
    table = NodeTable()
    table.pin(table.node(ROOT))
    table.set_attr(table.node(ROOT), tree.attr(ROOT), 1, 0)
    return table, tree, ids


def node_of(outcome: Resolved | int) -> int:
    assert isinstance(outcome, Resolved), f"failed with {outcome}"
    assert outcome.node is not None
    return outcome.node.nodeid


@pytest.mark.parametrize(("path", "follow", "expect"), [
    (b"d/f", True, "f"), (b"/d/./f", True, "f"), (b"d//f", True, "f"),
    (b"d/sub/..", True, "d"), (b"d/sub/../f", True, "f"), (b"..", True, None),
    (b"../../d", True, "d"),  # never above the root
    (b"d/f/", True, errno.ENOTDIR), (b"d/f/.", True, errno.ENOTDIR),
    (b"d/f/..", True, errno.ENOTDIR), (b"d/f/x", True, errno.ENOTDIR),
    (b"lf", True, "f"), (b"lf", False, "lf"), (b"ld/f", False, "f"),
    (b"ld/", False, "d"),  # a trailing slash follows the last link
    (b"lf/", True, errno.ENOTDIR), (b"abs/..", True, "d"), (b"deep", True, "sub"),
    (b"loop", True, errno.ELOOP), (b"loop", False, "loop"), (b"loop/x", False, errno.ELOOP),
    (b"dangling", True, errno.ENOENT), (b"dangling", False, "dangling"),
    (b"empty", True, errno.ENOENT), (b"nope", True, errno.ENOENT),
    (b"nope/..", True, errno.ENOENT), (b"slashdir/f", True, "f"),
    (b"slashfile", True, errno.ENOTDIR),
])
def test_lookup_rules(world: tuple[NodeTable, Tree, dict[str, int]], path: bytes,
                      follow: bool, expect: str | int | None) -> None:
    table, tree, ids = world
    outcome = resolve(table, tree, path, follow=follow)
    if isinstance(expect, int):
        assert outcome == expect
    else:
        assert node_of(outcome) == (ROOT if expect is None else ids[expect])


@pytest.mark.parametrize(("path", "parent", "name", "trailing"), [
    (b"d/new", "d", b"new", False), (b"d/f", "d", b"f", False), (b"lf", None, b"lf", False),
    (b"ld/x", "d", b"x", False), (b"d/new/", "d", b"new", True), (b"d/.", "d", b".", False),
    (b"d/..", "d", b"..", False), (b"/", None, ROOT_NAME, True), (b"d/sub/../x", "d", b"x",
                                                                 False),
])
def test_parent_rules(world: tuple[NodeTable, Tree, dict[str, int]], path: bytes,
                      parent: str | None, name: bytes, trailing: bool) -> None:
    table, tree, ids = world
    outcome = resolve(table, tree, path, mode=PARENT)
    assert isinstance(outcome, Resolved) and outcome.node is None
    assert outcome.parent is not None
    assert outcome.parent.nodeid == (ROOT if parent is None else ids[parent])
    assert outcome.name == name and outcome.trailing == trailing


def test_parent_of_a_file_component_is_enotdir(world: tuple[NodeTable, Tree,
                                                            dict[str, int]]) -> None:
    table, tree, _ = world
    assert resolve(table, tree, b"d/f/x", mode=PARENT) == errno.ENOTDIR
    assert resolve(table, tree, b"d/f/..", mode=PARENT) == errno.ENOTDIR


@pytest.mark.parametrize(("path", "follow", "expect"), [
    (b"d/new", True, ("create", "d", b"new")), (b"d/f", True, "f"),
    (b"lf", True, "f"),  # an existing file through a link
    (b"lf", False, errno.ELOOP),  # O_CREAT | O_NOFOLLOW on a link
    (b"dangling", True, ("create", None, b"nope")),  # a dangling link creates its target
    (b"dangling", False, errno.ELOOP), (b"new/", True, errno.EISDIR),
    (b"d/..", True, errno.EISDIR), (b"/", True, errno.EISDIR), (b"d", True, "d"),
    (b"nope/new", True, errno.ENOENT), (b"d/f/new", True, errno.ENOTDIR),
    (b"loop", True, errno.ELOOP), (b"slashdir", True, errno.EISDIR),
])
def test_create_rules(world: tuple[NodeTable, Tree, dict[str, int]], path: bytes,
                      follow: bool, expect: object) -> None:
    table, tree, ids = world
    outcome = resolve(table, tree, path, mode=CREATE, follow=follow)
    if isinstance(expect, int):
        assert outcome == expect
    elif isinstance(expect, tuple):
        assert isinstance(outcome, Resolved) and outcome.node is None
        _, parent, name = expect
        assert outcome.parent is not None
        assert outcome.parent.nodeid == (ROOT if parent is None else ids[parent])
        assert outcome.name == name
    else:
        assert node_of(outcome) == ids[str(expect)]


def test_forty_links_resolve_and_forty_one_loop() -> None:
    tree = Tree()
    tree.add(ROOT, b"l0", stat.S_IFREG | 0o644)
    for i in range(1, 42):
        tree.add(ROOT, f"l{i}".encode(), stat.S_IFLNK | 0o777, f"l{i - 1}".encode())
    table = NodeTable()
    table.set_attr(table.node(ROOT), tree.attr(ROOT), 1, 0)
    assert isinstance(resolve(table, tree, b"l40"), Resolved)
    assert resolve(table, tree, b"l41") == errno.ELOOP


def test_search_permission_for_other_users(world: tuple[NodeTable, Tree,
                                                        dict[str, int]]) -> None:
    table, tree, ids = world
    tree.entries[ids["d"]].mode = stat.S_IFDIR | 0o700  # root's private directory
    user = Cred(1000, 1000)
    assert resolve(table, tree, b"d/f", cred=user) == errno.EACCES
    assert node_of(resolve(table, tree, b"d/f", cred=Cred(0, 0))) == ids["f"]
    tree.entries[ids["d"]].uid = 1000
    table.invalidate(ids["d"])  # a chmod/chown: attributes are fetched again
    assert node_of(resolve(table, tree, b"d/f", cred=user)) == ids["f"]


def test_cached_walk_asks_nothing_and_expiry_asks_again(
        world: tuple[NodeTable, Tree, dict[str, int]]) -> None:
    now = [100.0]
    table, tree, ids = world
    table.clock = lambda: now[0]
    table.set_attr(table.node(ROOT), tree.attr(ROOT), 1000, 0)
    assert node_of(resolve(table, tree, b"d/sub")) == ids["sub"]
    asked = len(tree.requests)
    assert asked == 2
    assert node_of(resolve(table, tree, b"d/sub")) == ids["sub"]
    assert len(tree.requests) == asked  # all from the name cache
    now[0] += 2  # past the entry timeout (1 s)
    assert node_of(resolve(table, tree, b"d/sub")) == ids["sub"]
    assert len(tree.requests) == 2 * asked


def test_zero_ttl_entries_are_used_once_not_looked_up_forever() -> None:
    """cache=none: every entry is expired the moment it is learned; the walk still uses
    what the LOOKUP answered instead of asking again."""
    tree = Tree()
    d = tree.add(ROOT, b"d", stat.S_IFDIR | 0o755)
    f = tree.add(d, b"f", stat.S_IFREG | 0o644)
    table = NodeTable()
    table.set_attr(table.node(ROOT), tree.attr(ROOT), 1, 0)
    assert node_of(drive(table, tree, walk_of(table, b"d/f"), ttl=0)) == f
    assert [r for r, _ in tree.requests].count("lookup") == 2


def test_walk_pins_its_nodes_against_eviction() -> None:
    """Another walk filling the table meanwhile cannot make it forget a node this walk
    stands on; once released, eviction takes it and owes its lookups back."""
    tree = Tree()
    d = tree.add(ROOT, b"d", stat.S_IFDIR | 0o755)
    for i in range(10):
        tree.add(ROOT, f"x{i}".encode(), stat.S_IFREG | 0o644)
    table = NodeTable(max_nodes=4)
    table.pin(table.node(ROOT))
    table.set_attr(table.node(ROOT), tree.attr(ROOT), 1, 0)
    walk = walk_of(table, b"d/missing")
    need = walk.step()
    assert need == NeedLookup(ROOT, b"d")
    walk.found(table.learn(ROOT, b"d", tree.entry(d)))
    assert walk.step() == NeedLookup(d, b"missing")
    for i in range(10):  # meanwhile, other lookups overflow the table
        table.learn(ROOT, f"x{i}".encode(), tree.entry(tree.entries[ROOT].children[
            f"x{i}".encode()]))
    assert table.get(d) is not None, "a pinned node was evicted"
    with pytest.raises(FileNotFoundError):
        walk.found(None)
    walk.release()
    for i in range(10, 14):
        name = f"y{i}".encode()
        table.learn(ROOT, name, tree.entry(tree.add(ROOT, name, stat.S_IFREG | 0o644)))
    assert table.get(d) is None
    forgotten = dict(table.take_forgets())
    assert forgotten[d] == 1 and len(table) <= 4


def test_node_table_names_and_forgets() -> None:
    tree = Tree()
    d = tree.add(ROOT, b"d", stat.S_IFDIR | 0o755)
    f = tree.add(d, b"f", stat.S_IFREG | 0o644)
    table = NodeTable()
    table.learn(ROOT, b"d", tree.entry(d))
    table.learn(d, b"f", tree.entry(f))
    table.learn(d, b"f", tree.entry(f))  # looked up twice: two lookups owed
    node = table.get(f)
    assert node is not None and node.nlookup == 2
    table.pin(node)  # an open file
    table.drop_name(d, b"f")  # unlinked while open: kept
    assert table.get(f) is not None and table.take_forgets() == []
    table.unpin(node)  # closed: now it goes
    assert table.take_forgets() == [(f, 2)] and table.get(f) is None
    table.learn(d, b"f", tree.entry(f))
    table.move_name(d, b"f", ROOT, b"g")
    moved = table.cached(ROOT, b"g")
    assert table.cached(d, b"f") is None and moved is not None and moved.nodeid == f
    dnode = table.get(d)
    assert dnode is not None
    table.forget(dnode)  # what is cached below goes with it
    assert sorted(table.take_forgets()) == [(d, 1)]
    assert table.get(f) is not None  # reached through its other name still
    table.forget_all()
    assert table.take_forgets() == [(f, 1)] and len(table) == 0


# -- the host as the reference -----------------------------------------------------------------

NAMES = [b"a", b"b", b"c"]


@st.composite
def trees(draw: st.DrawFn) -> list[tuple[bytes, str, bytes]]:
    """(path, kind, link target) entries: directories, files, relative links."""
    out: list[tuple[bytes, str, bytes]] = []
    dirs = [b""]
    for _ in range(draw(st.integers(1, 8))):
        parent = draw(st.sampled_from(dirs))
        name = draw(st.sampled_from(NAMES))
        path = parent + b"/" + name if parent else name
        if any(p == path for p, _, _ in out):
            continue
        kind = draw(st.sampled_from(["dir", "file", "link"]))
        target = b""
        if kind == "link":
            target = b"/".join(draw(st.lists(st.sampled_from([*NAMES, b".", b".."]),
                                             min_size=1, max_size=3)))
            # Relative and never above the root from where the link is (the host's
            # root is not the tree's).
            depth = path.count(b"/")
            level = depth
            for part in target.split(b"/"):
                level = level - 1 if part == b".." else level + (part != b".")
                if level < 0:
                    target = b"a"
                    break
        out.append((path, kind, target))
        if kind == "dir":
            dirs.append(path)
    return out


def build(entries: list[tuple[bytes, str, bytes]], host: Path) -> Tree:
    tree = Tree()
    ids = {b"": ROOT}
    for path, kind, target in entries:
        parent, _, name = path.rpartition(b"/")
        mode = {"dir": stat.S_IFDIR | 0o755, "file": stat.S_IFREG | 0o644,
                "link": stat.S_IFLNK | 0o777}[kind]
        ids[path] = tree.add(ids[parent], name, mode, target)
        full = os.path.join(os.fsencode(host), path)
        if kind == "dir":
            os.mkdir(full)
        elif kind == "file":
            Path(os.fsdecode(full)).write_bytes(b"")
        else:
            os.symlink(target, full)
    return tree


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_SYS_OPENAT2 = 437
_RESOLVE_IN_ROOT = 0x10
_libc = ctypes.CDLL(None, use_errno=True)


def stat_in_root(root: bytes, path: bytes, *, follow: bool) -> int:
    """The inode `path` names when `root` is the root directory, as on the share.

    openat2(RESOLVE_IN_ROOT) resolves `..` and absolute symlinks as a chroot
    would, so a symlink to `.` followed by `..` stays at the root, as it does
    on the share, instead of climbing into the host's parent folder.
    """
    how = _OpenHow(os.O_PATH | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW), 0,
                   _RESOLVE_IN_ROOT)
    dirfd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        fd = _libc.syscall(_SYS_OPENAT2, dirfd, path or b".", ctypes.byref(how),
                           ctypes.sizeof(how))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(dirfd)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def host_ino_to_id(host: Path, tree: Tree) -> Iterator[tuple[int, int]]:
    """(host inode, tree node id) for every entry."""
    stack = [(os.fsencode(host), ROOT)]
    while stack:
        path, nodeid = stack.pop()
        yield os.lstat(path).st_ino, nodeid
        for name, child in tree.entries[nodeid].children.items():
            stack.append((os.path.join(path, name), child))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=trees(), parts=st.lists(st.sampled_from([*NAMES, b".", b".."]), min_size=1,
                                       max_size=5),
       trailing=st.booleans(), follow=st.booleans())
def test_lookup_agrees_with_the_host(tmp_path_factory: pytest.TempPathFactory,
                                     entries: list[tuple[bytes, str, bytes]],
                                     parts: list[bytes], trailing: bool, follow: bool) -> None:
    host = tmp_path_factory.mktemp("tree")
    tree = build(entries, host)
    path = b"/".join(parts) + (b"/" if trailing else b"")
    table = NodeTable()
    table.set_attr(table.node(ROOT), tree.attr(ROOT), 1, 0)
    got = resolve(table, tree, path, follow=follow)
    try:
        want = stat_in_root(os.fsencode(host), path, follow=follow)
    except OSError as exc:
        assert got == exc.errno, (path, entries)
        return
    inodes = dict(host_ino_to_id(host, tree))
    assert node_of(got) == inodes[want], (path, entries)
    assert table.lookups_held() == sum(n.nlookup for n in table.nodes())
