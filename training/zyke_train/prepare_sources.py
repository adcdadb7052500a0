"""The sources of ``zyke-train prepare``: Hub datasets (streamed) and local files (text, Markdown, JSONL, EPUB)
read as documents ``(text, group)``; Project Gutenberg boilerplate stripped, EPUB read in spine order.
"""

from __future__ import annotations

import json
import posixpath
import re
import unicodedata
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote

from .errors import PrepareError

LOCAL_SUFFIXES = (".txt", ".md", ".jsonl", ".epub")


# -- sources


@dataclass(frozen=True)
class Source:
    """One input: ``kind`` "hub" (``spec`` = NAME[:CONFIG][:SPLIT]) or "local" (a file or folder)."""

    kind: str
    spec: str
    name: str
    weight: float = 1.0
    profile: str = "books"
    text_field: str = "text"


Doc = tuple[str, str]  # (text, group)
HubLoader = Callable[[str, str | None, str], Iterable[dict[str, Any]]]


def parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    """NAME[:CONFIG][:SPLIT] -> (name, config, split). A spec that is an existing path is a local dataset
    folder (datasets infers the json/text/parquet builder from its files) with split "train"."""
    if Path(spec).exists():
        return spec, None, "train"
    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        raise PrepareError(f"--hub {spec!r}: expected NAME[:CONFIG][:SPLIT]")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), "train"
    if len(parts) == 3 and parts[2]:
        split = parts[2]
    return name, config, split


def hub_loader(name: str, config: str | None, split: str) -> Iterable[dict[str, Any]]:
    """Stream a dataset with ``datasets.load_dataset(..., streaming=True)``: nothing is downloaded whole."""
    try:
        import datasets
    except ImportError as exc:
        raise PrepareError("--hub needs the datasets library: pip install 'zyke[train]'") from exc
    try:
        stream: Iterable[dict[str, Any]] = datasets.load_dataset(name, config, split=split, streaming=True)
        return stream  # an IterableDataset: it yields one dict per row
    except Exception as exc:  # datasets raises many types offline (ConnectionError, DatasetNotFoundError, ...)
        raise PrepareError(f"could not open Hub dataset {name!r} (config {config}, split {split}): {exc}. "
                           "Offline? Hub sources need network access; use --local for files on disk.") from exc


def iter_hub(source: Source, loader: HubLoader | None = None) -> Iterator[Doc]:
    name, config, split = parse_hub_spec(source.spec)
    rows = iter((loader or hub_loader)(name, config, split))
    i = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as exc:  # a dropped connection mid-stream: what was flushed is kept, the rest resumes
            raise PrepareError(f"reading {source.spec!r} failed at row {i}: {exc}. Re-run the same command to "
                               "resume from the last finished shard.") from exc
        text = row.get(source.text_field) if isinstance(row, dict) else None
        yield (text if isinstance(text, str) else ""), f"{source.name}#{i}"
        i += 1


def local_files(path: Path) -> list[Path]:
    """The readable files under ``path`` in a stable (sorted) order, so a resumed run sees the same stream."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PrepareError(f"--local {path}: no such file or folder")
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)


def iter_local(source: Source) -> Iterator[Doc]:
    root = Path(source.spec)
    for file in local_files(root):
        rel = file.name if root.is_file() else file.relative_to(root).as_posix()
        group = f"{source.name}:{rel}"
        suffix = file.suffix.lower()
        if suffix == ".jsonl":
            yield from _jsonl_docs(file, group, source.text_field)
        elif suffix == ".epub":
            yield from ((p, group) for p in epub_paragraphs(file))
        elif suffix in (".txt", ".md"):
            yield from ((p, group) for p in text_paragraphs(file.read_text(encoding="utf-8", errors="replace")))
        else:  # a single file named directly with another suffix: treat it as text
            yield from ((p, group) for p in text_paragraphs(file.read_text(encoding="utf-8", errors="replace")))


def _jsonl_docs(file: Path, group: str, text_field: str) -> Iterator[Doc]:
    with file.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            text = row.get(text_field) if isinstance(row, dict) else None
            yield (text if isinstance(text, str) else ""), f"{group}#{lineno}"


_GUTENBERG_START = re.compile(r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_GUTENBERG_END = re.compile(r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)",
                            re.I | re.M)


def strip_gutenberg(text: str) -> tuple[str, bool]:
    """Cut a Project Gutenberg file to the book between its START and END lines (license and credits out)."""
    start = _GUTENBERG_START.search(text)
    if start is None:
        return text, False
    body = text[start.end():]
    end = _GUTENBERG_END.search(body)
    return (body[:end.start()] if end else body), True


def text_paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs. Gutenberg files are hard-wrapped at ~70 columns, so their lines are
    joined back; other text keeps its line breaks (Markdown lists, verse)."""
    text, gutenberg = strip_gutenberg(text.replace("\r\n", "\n").replace("\r", "\n"))
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        block = " ".join(block.split()) if gutenberg else "\n".join(ln.rstrip() for ln in block.strip().splitlines())
        if block.strip():
            paragraphs.append(block.strip())
    return paragraphs


class _HtmlText(HTMLParser):
    """Text of an XHTML chapter, one paragraph per block element; script and style skipped."""

    BLOCKS = frozenset({"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "blockquote", "pre", "tr", "br",
                        "section", "article", "dd", "dt", "figcaption"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._buf: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style", "head"):
            self._skip += 1
        elif tag in self.BLOCKS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head"):
            self._skip = max(0, self._skip - 1)
        elif tag in self.BLOCKS:
            self._flush()

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self._buf.append(data)

    def _flush(self) -> None:
        text = " ".join("".join(self._buf).split())
        if text:
            self.paragraphs.append(text)
        self._buf = []

    def close(self) -> None:
        super().close()
        self._flush()


def epub_paragraphs(path: Path) -> list[str]:
    """Paragraphs of an EPUB in reading order: container.xml -> OPF spine -> XHTML files (stdlib only)."""
    try:
        with zipfile.ZipFile(path) as z:
            paragraphs: list[str] = []
            for name in _epub_spine(z):
                parser = _HtmlText()
                parser.feed(z.read(name).decode("utf-8", errors="replace"))
                parser.close()
                paragraphs.extend(parser.paragraphs)
            return paragraphs
    except (zipfile.BadZipFile, KeyError, ET.ParseError) as exc:
        raise PrepareError(f"{path}: not a readable EPUB ({exc})") from exc


def _epub_spine(z: zipfile.ZipFile) -> list[str]:
    names = set(z.namelist())
    try:
        container = ET.fromstring(z.read("META-INF/container.xml"))
        opf_path = next(el.get("full-path") for el in container.iter() if el.tag.endswith("rootfile"))
    except (KeyError, StopIteration):
        opf_path = None
    if not opf_path:  # no container: every XHTML file in name order
        return sorted(n for n in names if n.lower().endswith((".xhtml", ".html", ".htm")))
    opf = ET.fromstring(z.read(opf_path))
    base = PurePosixPath(opf_path).parent
    items = {el.get("id"): el.get("href") for el in opf.iter() if el.tag.endswith("item")}
    spine = [items.get(el.get("idref")) for el in opf.iter() if el.tag.endswith("itemref")]
    # hrefs are URLs relative to the OPF: percent-decoded, may climb with "../", may carry a #fragment
    paths = [posixpath.normpath(posixpath.join(str(base), unquote(href.split("#")[0]))) for href in spine if href]
    return [p for p in dict.fromkeys(paths) if p in names]


def normalize_text(text: str) -> str:
    return unicodedata.normalize("NFC", text).strip()
