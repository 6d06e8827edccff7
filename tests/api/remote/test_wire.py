"""Strict validation of what a peer sends (api/remote/wire.py): types, ranges, nesting.
Pure: no server. Every case here reached a handler (or crashed the decoder) before."""

from __future__ import annotations

import errno

import msgspec
import pytest

from pyvirtiofs.actors import messages as m
from pyvirtiofs.api.remote import wire

OFF_MAX = (1 << 63) - 1
enc = msgspec.msgpack.encode


def _decode(op: object, handle: int = 0, data: bytes | None = None) -> wire.RequestHeader:
    frames = [wire.encode_request(1, op, handle)]
    if data is not None:
        frames.append(data)
    return wire.decode_request(frames)


def _refused(op: object, handle: int = 0, data: bytes | None = None) -> int:
    with pytest.raises(wire.WireFormatError) as info:
        _decode(op, handle, data)
    return info.value.errno


@pytest.mark.parametrize(("op", "handle", "code"), [
    (m.SetAttr(path=b"x", atime="yesterday"), 0, errno.EINVAL),
    (m.SetAttr(path=b"x", mtime=(0, 1_000_000_000)), 0, errno.EINVAL),
    (m.SetAttr(path=b"x", mtime=((1 << 64) - 1, 0)), 0, errno.EINVAL),
    (m.SetAttr(path=b"x", size=-1), 0, errno.EINVAL),
    (m.SetAttr(path=b"x", size=OFF_MAX + 1), 0, errno.EINVAL),
    (m.SetAttr(path=b"x", uid=1 << 32), 0, errno.EINVAL),
    (m.SetAttr(path=b"x", mode=-5), 0, errno.EINVAL),
    (m.Read(size=10, offset=(1 << 64) - 1), 5, errno.EINVAL),
    (m.Read(size=10, offset=-1), 5, errno.EINVAL),
    (m.Read(size=10, offset=OFF_MAX - 5), 5, errno.EINVAL),  # offset + size overflows
    (m.Read(size=-1), 5, errno.EINVAL),
    (m.Seek(offset=1 << 63), 5, errno.EINVAL),
    (m.Seek(offset=0, whence=9), 5, errno.EINVAL),
    (m.FTruncate(size=-1), 5, errno.EINVAL),
    (m.FAllocate(offset=0, length=0), 5, errno.EINVAL),
    (m.FAllocate(offset=-1, length=10), 5, errno.EINVAL),
    (m.FAllocate(offset=1, length=OFF_MAX), 5, errno.EFBIG),
    (m.FAllocate(offset=0, length=10, mode=0x1000), 5, errno.EOPNOTSUPP),
    (m.Open(path=b"x", flags=1 << 40), 0, errno.EINVAL),
    (m.MakeDir(path=b"x", mode=1 << 32), 0, errno.EINVAL),
    (m.Access(path=b"x", mode=8), 0, errno.EINVAL),
    (m.Stat(path=b"x", ctx=(0, 0, -1)), 0, errno.EINVAL),
    (m.Stat(path=b"x", groups=(1 << 33,)), 0, errno.EINVAL),
    (m.SetXattr(path=b"x", name=b"user.a", value=b"", flags=8), 0, errno.EINVAL),
])
def test_out_of_range_values_are_refused_with_linux_errnos(op: object, handle: int,
                                                           code: int) -> None:
    assert _refused(op, handle) == code


def test_write_offset_plus_length_beyond_the_largest_offset_is_einval() -> None:
    assert _refused(m.Write(data=None, offset=OFF_MAX - 2), 5, b"abcd") == errno.EINVAL
    assert _decode(m.Write(data=None, offset=OFF_MAX - 4), 5, b"abcd").op.offset == OFF_MAX - 4


def test_values_in_range_pass() -> None:
    for op, handle in [(m.SetAttr(path=b"x", atime="now", mtime=(-5, 999_999_999), size=OFF_MAX,
                                  uid=-1, gid=(1 << 32) - 2), 0),
                       (m.Read(size=wire.MAX_DATA_BYTES, offset=0), 5),
                       (m.Seek(offset=-(1 << 63), whence=1), 5),
                       (m.FAllocate(offset=1, length=OFF_MAX - 1, mode=3), 5),
                       (m.Stat(path=b"x", ctx=(0, 0, (1 << 32) - 1), groups=(1, 2)), 0)]:
        assert _decode(op, handle).op == op


@pytest.mark.parametrize("raw", [
    enc([1, {"type": "Stat", "path": "text, not bytes"}]),
    enc([1, {"type": "Stat", "path": b"x", "follow": 1}]),  # an int is not a bool
    enc([1, {"type": "Read", "size": True}, 5]),  # a bool is not an int
    enc([1, {"type": "SetAttr", "path": b"x", "atime": [1]}]),
    enc([1, {"type": "Forgotten", "nodeid": 1}]),  # internal: not in the union
    enc([(1 << 64) - 1, {"type": "Stat", "path": b"x"}]),
    enc([1, {"type": "Stat", "path": b"x"}, -3]),
])
def test_wrong_types_are_einval(raw: bytes) -> None:
    with pytest.raises(wire.WireFormatError) as info:
        wire.decode_request([raw])
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("where", ["unknown field", "known field", "header"])
def test_deep_nesting_is_einval_not_a_recursion_error(where: str) -> None:
    deep = b"\x91" * 200_000 + b"\xc0"  # [[[[...nil...]]]]
    if where == "unknown field":
        raw = b"\x92\x01\x83\xa4type\xa4Stat\xa4path\xc4\x01x\xa3zzz" + deep
    elif where == "known field":
        raw = b"\x92\x01\x82\xa4type\xa7SetAttr\xa5atime" + deep
    else:
        raw = deep
    with pytest.raises(wire.WireFormatError) as info:
        wire.decode_request([raw])
    assert info.value.errno == errno.EINVAL


def test_a_close_is_told_apart_before_decoding() -> None:
    assert wire.looks_like_close([wire.encode_request(7, m.Close(), handle=5)])
    for op in (m.Stat(path=b"Close"), m.Read(size=1, offset=0)):  # ("Close" as a name: no)
        assert not wire.looks_like_close([wire.encode_request(7, op, handle=5)])
    assert not wire.looks_like_close([])
    assert not wire.looks_like_close([b"\xa5Close" + b"\0" * 64])  # too long for a Close


@pytest.mark.parametrize(("frames", "request_id"), [
    ([wire.encode_request(42, m.Stat(path=b"x"))], 42),
    ([msgspec.msgpack.encode([7, "garbage"])], 7),  # a header that decodes no further
    ([msgspec.msgpack.encode([True, 1])], 0),  # a bool is no id
    ([msgspec.msgpack.encode([-1])], 0),
    ([msgspec.msgpack.encode([1 << 63])], 0),
    ([b"\xc1"], 0),  # not msgpack at all
    ([b"\x91" * 10_000], 0),  # nested past any limit
    ([], 0),
])
def test_the_request_id_of_a_refused_request_is_peeked_when_it_can_be(
        frames: list[bytes], request_id: int) -> None:
    assert wire.peek_request_id(frames) == request_id
