"""A small reader for R's XDR serialisation (enough for lazy-load DBs of character vectors / lists).

Used to read Jane Austen's novels out of the Debian package r-cran-janeaustenr without installing R.
Format reference: R's src/main/serialize.c. Only the item types that appear in data lazy-load DBs
are supported; anything else raises `RFormatError` naming the type, never a silent skip.

Lazy-load DB layout: `<name>.rdx` is a gzip'd serialisation of list(variables=, references=, compressed=)
where `variables` is a named list of c(offset, length) int pairs into `<name>.rdb`; each blob there is a
4-byte big-endian uncompressed length followed by a zlib stream of a serialisation ("X\\n" header).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# SEXP type codes (serialize.c / Rinternals.h)
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP = 0, 1, 2, 3, 4
LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP, VECSXP = 10, 13, 14, 15, 16, 19
CHARSXP = 9
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP = 255, 254, 253, 252
MISSINGARG_SXP, BASENAMESPACE_SXP, EMPTYENV_SXP, BASEENV_SXP = 251, 247, 242, 241
ALTREP_SXP, ATTRLISTSXP, ATTRLANGSXP = 238, 239, 240
NA_INTEGER = -(2**31)


class RFormatError(ValueError):
    pass


@dataclass
class RObject:
    """A decoded R value: kind is the R type name, value a Python list (or dict for pairlists)."""

    kind: str
    value: Any
    attrs: dict[str, Any] = field(default_factory=dict)

    def names(self) -> list[str] | None:
        n = self.attrs.get("names")
        return n.value if isinstance(n, RObject) else None

    def as_dict(self) -> dict[str, Any]:
        """A named vector/list as {name: element}."""
        names = self.names()
        if names is None:
            raise RFormatError(f"R {self.kind} has no names attribute")
        return dict(zip(names, self.value))


class _Reader:
    def __init__(self, buf: bytes):
        self.buf = buf
        self.pos = 0
        self.refs: list[Any] = []

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise RFormatError(f"R serialisation truncated at byte {self.pos} (need {n} more)")
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two ints
            hi, lo = self.int(), self.int()
            n = (hi << 32) + (lo & 0xFFFFFFFF)
        if n < 0:
            raise RFormatError(f"negative vector length {n}")
        return n

    def header(self) -> None:
        if self._take(2) != b"X\n":
            raise RFormatError("not an R XDR serialisation (missing 'X\\n' header)")
        version = self.int()
        self.int()  # writer R version
        self.int()  # minimal reader version
        if version == 3:
            self._take(self.int())  # native encoding name
        elif version != 2:
            raise RFormatError(f"unsupported R serialisation version {version}")

    def attributes(self) -> dict[str, Any]:
        pl = self.item()
        if not isinstance(pl, RObject) or pl.kind != "pairlist":
            raise RFormatError("attributes are not a pairlist")
        return dict(pl.value)

    def item(self) -> Any:
        flags = self.int()
        typ = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        if typ == NILVALUE_SXP:
            return None
        if typ in (GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP, BASENAMESPACE_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP):
            return RObject("special", typ)
        if typ == REFSXP:
            idx = flags >> 8
            if idx == 0:
                idx = self.int()
            if not 1 <= idx <= len(self.refs):
                raise RFormatError(f"bad reference index {idx}")
            return self.refs[idx - 1]
        if typ == SYMSXP:
            name = self.item()  # a CHARSXP
            sym = RObject("symbol", name)
            self.refs.append(sym)
            return sym
        if typ == CHARSXP:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            raw = self._take(n)
            # levels bit 2 = latin1, bit 3 = UTF-8, bit 6 = ASCII; bytes otherwise. Austen is UTF-8/ASCII.
            enc = "latin-1" if (flags >> 12) & 4 else "utf-8"
            return raw.decode(enc, errors="replace")
        if typ in (LISTSXP, ATTRLISTSXP):
            items: list[tuple[str | None, Any]] = []
            while True:
                attrs = self.attributes() if has_attr else {}
                del attrs  # pairlist-cell attributes are not needed here
                tag = self.item() if has_tag else None
                car = self.item()
                tagname = tag.value if isinstance(tag, RObject) and tag.kind == "symbol" else None
                items.append((tagname, car))
                # The CDR follows; iterate instead of recursing when it is another pairlist cell.
                nflags = struct.unpack(">i", self.buf[self.pos : self.pos + 4])[0]
                ntyp = nflags & 0xFF
                if ntyp in (LISTSXP, ATTRLISTSXP):
                    self.pos += 4
                    has_attr = bool(nflags & (1 << 9))
                    has_tag = bool(nflags & (1 << 10))
                    continue
                cdr = self.item()
                if cdr is not None:
                    raise RFormatError("dotted pairlist (non-NULL CDR) not supported")
                return RObject("pairlist", items)
        if typ == STRSXP:
            value: Any = [self.item() for _ in range(self.length())]
            kind = "character"
        elif typ == VECSXP:
            value = [self.item() for _ in range(self.length())]
            kind = "list"
        elif typ in (INTSXP, LGLSXP):
            n = self.length()
            value = [None if v == NA_INTEGER else v for v in struct.unpack(f">{n}i", self._take(4 * n))]
            kind = "integer" if typ == INTSXP else "logical"
        elif typ == REALSXP:
            n = self.length()
            value = list(struct.unpack(f">{n}d", self._take(8 * n)))
            kind = "double"
        elif typ == ALTREP_SXP:
            return self.altrep()
        else:
            raise RFormatError(f"unsupported R SEXP type {typ} at byte {self.pos - 4}")
        obj = RObject(kind, value)
        if has_attr:
            obj.attrs = self.attributes()
        return obj

    def altrep(self) -> Any:
        info = self.item()  # pairlist(class symbol, package symbol, type int)
        state = self.item()
        attr = self.item()
        cls = info.value[0][1].value if isinstance(info, RObject) else "?"
        if cls.startswith("wrap_") and isinstance(state, RObject) and state.kind == "list":
            obj = state.value[0]
        elif cls == "deferred_string" and isinstance(state, RObject):
            # state = pairlist(original vector, scalar info): convert numbers to strings like R would.
            src = state.value[0][1] if state.kind == "pairlist" else state
            obj = RObject("character", [None if v is None else str(v) for v in src.value])
        elif cls == "compact_intseq" and isinstance(state, RObject):
            n, start, step = (int(v) for v in state.value)
            obj = RObject("integer", list(range(start, start + n * step, step)))
        else:
            raise RFormatError(f"unsupported ALTREP class {cls!r}")
        if isinstance(attr, RObject) and attr.kind == "pairlist":
            obj.attrs = dict(attr.value)
        return obj


def unserialize(buf: bytes) -> Any:
    """Decode one R XDR serialisation (with its 'X\\n' header)."""
    r = _Reader(buf)
    r.header()
    return r.item()


def read_rds_gz(path: str | Path) -> Any:
    return unserialize(gzip.decompress(Path(path).read_bytes()))


def decode_rdb_blob(blob: bytes) -> Any:
    """One lazy-load DB blob: 4-byte BE uncompressed length + zlib stream."""
    if len(blob) < 5:
        raise RFormatError("lazy-load blob too short")
    n = struct.unpack(">I", blob[:4])[0]
    try:
        raw = zlib.decompress(blob[4:])
    except zlib.error as e:
        raise RFormatError(f"lazy-load blob is not zlib (R's bzip2/xz variants are not supported): {e}") from e
    if len(raw) != n:
        raise RFormatError(f"lazy-load blob length mismatch: header {n}, got {len(raw)}")
    return unserialize(raw)


def read_lazyload_db(base: str | Path) -> dict[str, Any]:
    """Read every variable of an R lazy-load DB `base.rdx` / `base.rdb` into {name: RObject}."""
    base = Path(base)
    index = read_rds_gz(base.with_suffix(".rdx"))
    variables = index.as_dict()["variables"]
    rdb = base.with_suffix(".rdb").read_bytes()
    out = {}
    for name, loc in variables.as_dict().items():
        off, ln = loc.value
        out[name] = decode_rdb_blob(rdb[off : off + ln])
    return out
