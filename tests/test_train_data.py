import gzip
import struct
import zlib

import numpy as np
import pytest

import _train_path  # noqa: F401
from aios_train.data import _VERSE, _chunk_paragraphs, is_valid
from aios_train.rxdr import RFormatError, decode_rdb_blob, read_lazyload_db, unserialize

# --- a tiny R XDR *writer*, enough to build synthetic lazy-load DBs the way R does ---


def i32(v):
    return struct.pack(">i", v)


def charsxp(s):
    if s is None:
        return i32(9) + i32(-1)
    b = s.encode("utf-8")
    return i32(9 | (8 << 12)) + i32(len(b)) + b  # UTF8_MASK in the levels


def sym(name):
    return i32(1) + charsxp(name)


def names_attr(names):
    # pairlist cell with tag: LISTSXP | HAS_TAG, tag symbol, CAR, then NILVALUE terminator
    return i32(2 | (1 << 10)) + sym("names") + strsxp(names) + i32(254)


def strsxp(values, names=None):
    flags = 16 | ((1 << 9) if names else 0)
    body = i32(len(values)) + b"".join(charsxp(v) for v in values)
    return i32(flags) + body + (names_attr(names) if names else b"")


def intsxp(values):
    return i32(13) + i32(len(values)) + b"".join(i32(v) for v in values)


def vecsxp(items, names=None):
    flags = 19 | ((1 << 9) if names else 0)
    return i32(flags) + i32(len(items)) + b"".join(items) + (names_attr(names) if names else b"")


def serialize(item):
    return b"X\n" + i32(3) + i32(0x040201) + i32(0x030500) + i32(5) + b"UTF-8" + item


def test_unserialize_character_vector_with_names_and_na():
    obj = unserialize(serialize(strsxp(["It is a truth", "", None, "caf\u00e9"], names=["a", "b", "c", "d"])))
    assert obj.kind == "character"
    assert obj.value == ["It is a truth", "", None, "caf\u00e9"]
    assert obj.names() == ["a", "b", "c", "d"]


def test_lazyload_db_round_trip(tmp_path):
    books = {"emma": ["EMMA", "", "Emma Woodhouse, handsome,"], "persuasion": ["Sir Walter Elliot"]}
    rdb, locs = b"", {}
    for name, lines in books.items():
        raw = serialize(strsxp(lines))
        blob = struct.pack(">I", len(raw)) + zlib.compress(raw)
        locs[name] = (len(rdb), len(blob))
        rdb += blob
    variables = vecsxp([intsxp(list(locs[n])) for n in books], names=list(books))
    index = vecsxp([variables, vecsxp([]), i32(10) + i32(1) + i32(1)], names=["variables", "references", "compressed"])
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(serialize(index)))
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    db = read_lazyload_db(tmp_path / "Rdata")
    assert {k: v.value for k, v in db.items()} == books


def test_bad_blobs_raise():
    raw = serialize(strsxp(["x"]))
    with pytest.raises(RFormatError, match="length mismatch"):
        decode_rdb_blob(struct.pack(">I", len(raw) + 1) + zlib.compress(raw))
    with pytest.raises(RFormatError, match="truncated"):
        unserialize(raw[:-1])
    with pytest.raises(RFormatError, match="header"):
        unserialize(b"A\n" + raw[2:])
    with pytest.raises(RFormatError, match="unsupported R SEXP type 3"):
        unserialize(serialize(i32(3)))


def test_split_is_deterministic_and_seeded():
    docs = [f"document number {i}" for i in range(5000)]
    a = [is_valid("s", d, 0, 200) for d in docs]
    assert a == [is_valid("s", d, 0, 200) for d in docs]
    assert 50 < sum(a) < 150  # ~2%
    assert a != [is_valid("s", d, 1, 200) for d in docs]


def test_bible_verse_pattern_and_chunking():
    m = _VERSE.match("1Sm1:10 And she was in bitterness of soul")
    assert m.groups() == ("1Sm", "1", "10", "And she was in bitterness of soul")
    assert _VERSE.match("Ge1:1 In the beginning").group(1) == "Ge"
    assert _chunk_paragraphs(["aaaa", "bb", "cccccc", "d"], 5) == ["aaaa\nbb", "cccccc", "d"]
