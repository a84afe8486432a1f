"""Real text from a Debian system, in several genres, split into disjoint calibration/evaluation sets.

A conversion calibrated and evaluated on one genre can look fine and fail on the next; the
built-in corpus is therefore a *mix* of genres (table :data:`GENRES`), each read from the
Debian package that ships it:

============  ==============================================================  =================
genre         files                                                           package
============  ==============================================================  =================
python-docs   ``/usr/share/doc/python3*/html/_sources/**/*.txt`` (reST)       python3-doc
man           ``/usr/share/man/man{1,5,7,8}/*.gz`` (troff, English only)      (base system)
info          ``/usr/share/info/*.info*.gz``, one document per node           (base system)
policy        Debian policy ``*.txt.gz``, ``/usr/share/common-licenses/*``,    debian-policy,
              GNU standards ``*.text.gz``                                     gnu-standards
============  ==============================================================  =================

Info manuals whose text another genre already carries (Python's, Debian policy, GNU standards)
are left out of ``info``, so no text is on both sides of the split through two genres.

Each genre is split by document name: a document goes to evaluation iff
``crc32(name) % 4 == 0`` (about a quarter), the same on every machine. Documents are listed
eagerly (names only) and read lazily: ``/usr/share/man`` holds thousands of pages and a few
windows need only a handful. A genre with no files, or fewer than :data:`MIN_GENRE_CHARS`
characters on either side, is skipped with a warning; with no genre at all, the standard
library's docstrings (read with :mod:`ast`, never imported) stand in.

Windows (:func:`token_windows`) are drawn round robin over the genres of a corpus: window ``i``
comes from genre ``i % G``, so every prefix of the windows is balanced. Within a genre, windows
are consecutive, non-overlapping runs of the genre's documents concatenated in order.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import glob
import gzip
import logging
import os
import stat
import sysconfig
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, overload

import torch

from mlakit.errors import MlakitError
from mlakit.text.formats import info_nodes, man_to_text

logger = logging.getLogger(__name__)

Split = Literal["calibration", "evaluation"]
SPLITS: tuple[Split, ...] = ("calibration", "evaluation")
Reader = Literal["text", "man", "info"]

# a genre needs this much text on each side of the split to be part of the mix (~5k tokens)
MIN_GENRE_CHARS = 20_000
# long documents are tokenized in pieces of about this many characters (cut at blank lines), so
# a few short windows never tokenize a whole 500 kB manual
PIECE_CHARS = 16_384
USER_TEXT_SUFFIXES = (".txt", ".md", ".rst")


@dataclass(frozen=True)
class GenreSource:
    """Where one genre's files are and how to read them.

    Attributes:
        root: the directory document names are relative to; may be a glob, in which case the
            last match in reverse-sorted order that holds files wins (the newest ``python3.X``).
        files: glob patterns under ``root``, e.g. ``("man1/*.gz",)``.
        reader: ``"text"`` (plain or ``.gz``), ``"man"`` (troff -> text, one document per page)
            or ``"info"`` (one document per info node, named ``file#node``).
        exclude: ``fnmatch`` patterns on file names left out (text that another genre carries).
    """

    root: str
    files: tuple[str, ...]
    reader: Reader = "text"
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.reader not in ("text", "man", "info"):
            raise ValueError(f"GenreSource.reader={self.reader!r}: expected 'text', 'man' or 'info'")
        if not self.files:
            raise ValueError("GenreSource.files=(): expected at least one glob pattern")


# genre name -> source, in the order windows cycle through them (a read-only default argument of
# genre_corpora/default_corpus; tests pass their own table)
GENRES: Mapping[str, GenreSource] = MappingProxyType(
    {
        "python-docs": GenreSource("/usr/share/doc/python3*/html/_sources", ("**/*.txt",)),
        "man": GenreSource("/usr/share/man", ("man1/*.gz", "man5/*.gz", "man7/*.gz", "man8/*.gz"), reader="man"),
        "info": GenreSource(
            "/usr/share/info",
            ("*.info.gz", "*.info-*.gz"),
            reader="info",
            exclude=("python*", "debian-policy*", "standards.info*", "maintain.info*"),
        ),
        "policy": GenreSource(
            "/usr/share",
            ("doc/debian-policy/*.txt.gz", "common-licenses/*", "doc/gnu-standards/*.text.gz"),
        ),
    }
)


class Documents(Sequence[tuple[str, str]]):
    """``(name, text)`` pairs whose text is produced on access (read, decompressed, converted).

    Listing 18,000 man pages costs a directory walk; each page is read when a caller asks for
    it, and not kept, so iterating the whole of a large corpus streams it.
    """

    def __init__(self, entries: Iterable[tuple[str, str | Callable[[], str]]]) -> None:
        self._entries = tuple(entries)

    @property
    def names(self) -> tuple[str, ...]:
        """Document names, without reading any text."""
        return tuple(n for n, _ in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @overload
    def __getitem__(self, i: int) -> tuple[str, str]: ...

    @overload
    def __getitem__(self, i: slice) -> Documents: ...

    def __getitem__(self, i: int | slice) -> tuple[str, str] | Documents:
        if isinstance(i, slice):
            return Documents(self._entries[i])
        name, text = self._entries[i]
        return name, text if isinstance(text, str) else text()

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for name, text in self._entries:
            yield name, text if isinstance(text, str) else text()

    def __add__(self, other: Documents) -> Documents:
        return Documents(self._entries + other._entries)

    def filter(self, keep: Callable[[str], bool]) -> Documents:
        """The documents whose name passes ``keep``, still unread."""
        return Documents(e for e in self._entries if keep(e[0]))

    def __repr__(self) -> str:
        return f"Documents({len(self)} documents)"


@dataclass(frozen=True)
class Corpus:
    """Named documents of one genre, or a mix of genres (``parts``).

    Attributes:
        name: human-readable description of the source (printed by the CLI).
        documents: ``(name, text)`` pairs in a fixed order (a :class:`Documents`, read lazily;
            plain pairs are wrapped). For a mix, every part's documents in genre order.
        parts: for a mix, one single-genre corpus per genre, in the order windows cycle through
            them; empty for a single genre.
        genre: the genre's name (``"files"`` for user text); ``"mix"`` for a mix.

    Raises:
        ValueError: both ``documents`` and ``parts`` given, a part that is itself a mix, or two
            parts with the same genre.
    """

    name: str
    documents: Sequence[tuple[str, str]] = ()
    parts: tuple[Corpus, ...] = ()
    genre: str = "text"

    def __post_init__(self) -> None:
        if self.parts:
            genres = [p.genre for p in self.parts]
            if any(p.parts for p in self.parts) or len(set(genres)) != len(genres):
                raise ValueError(f"Corpus.parts genres={genres}: expected single-genre corpora with distinct genres")
            docs = Documents(())
            for p in self.parts:
                assert isinstance(p.documents, Documents)  # each part wrapped its own, below
                docs = docs + p.documents
            # documents of a mix are its parts' (dataclasses.replace passes them back: accepted)
            given = self.documents.names if isinstance(self.documents, Documents) else [n for n, _ in self.documents]
            if len(given) and tuple(given) != docs.names:
                raise ValueError(f"Corpus {self.name!r}: pass documents or parts, not both")
            object.__setattr__(self, "documents", docs)
            object.__setattr__(self, "genre", "mix")
        elif not isinstance(self.documents, Documents):
            object.__setattr__(self, "documents", Documents(self.documents))

    @property
    def genres(self) -> tuple[Corpus, ...]:
        """The single-genre corpora windows are drawn from: the parts of a mix, else itself."""
        return self.parts or (self,)

    def names(self) -> tuple[str, ...]:
        """Document names, without reading any text."""
        assert isinstance(self.documents, Documents)
        return self.documents.names

    def text(self) -> str:
        """All documents joined by blank lines (reads everything: mind the size of a mix)."""
        return "\n\n".join(t for _, t in self.documents)


def _in_split(name: str, split: Split) -> bool:
    is_eval = zlib.crc32(name.encode()) % 4 == 0
    return is_eval if split == "evaluation" else not is_eval


def _read(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def _read_man(path: str) -> str:
    return man_to_text(_read(path))


def _resolve_root(source: GenreSource) -> tuple[Path, list[str]] | None:
    """The root directory (the first in reverse-sorted glob order with matching files) and its files."""
    for d in sorted(glob.glob(source.root), reverse=True):
        if files := _files(d, source):
            return Path(d), files
    return None


def _files(root: str, source: GenreSource) -> list[str]:
    """Matching files, relative to ``root``, sorted; a symlink is skipped when its target is listed too.

    Strings and ``os`` calls rather than :class:`~pathlib.Path`: ``/usr/share/man`` has ~20k pages.
    """
    found = sorted({f for pattern in source.files for f in glob.glob(pattern, root_dir=root, recursive=True)})
    found = [f for f in found if not any(fnmatch.fnmatch(os.path.basename(f), x) for x in source.exclude)]
    # (device, inode) identifies a file whatever the path to it (cheaper than resolving paths)
    stats = {f: st for f in found if stat.S_ISREG((st := os.stat(os.path.join(root, f))).st_mode)}
    links = {f for f in stats if os.path.islink(os.path.join(root, f))}
    seen = {(st.st_dev, st.st_ino) for f, st in stats.items() if f not in links}
    out = []
    for f, st in stats.items():
        if f in links:
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
        out.append(f)
    return out


def _info_manual(name: str) -> str:
    """``coreutils.info`` for ``coreutils.info.gz`` and for the pieces ``find.info-2.gz``."""
    name = os.path.basename(name).removesuffix(".gz")
    stem, dash, piece = name.rpartition("-")
    return stem if dash and piece.isdigit() and stem.endswith(".info") else name


def _source_documents(root: Path, files: list[str], source: GenreSource) -> Documents:
    entries: list[tuple[str, str | Callable[[], str]]] = []
    for rel in files:
        path = os.path.join(root, rel)
        if source.reader == "info":  # node names are in the file: read it now (info is small)
            manual = _info_manual(rel)
            entries.extend((f"{manual}#{node}", text) for node, text in info_nodes(_read(path)))
            continue
        name = rel.removesuffix(".gz")
        entries.append((name, functools.partial(_read_man if source.reader == "man" else _read, path)))
    return Documents(entries)


def _has_chars(docs: Documents, need: int) -> bool:
    total = 0
    for _, text in docs:  # reads only until there is enough
        total += len(text)
        if total >= need:
            return True
    return False


def _available(genres: Mapping[str, GenreSource]) -> list[tuple[str, Path, dict[Split, Documents]]]:
    """``(genre, root, {split: documents})`` for each genre with enough text on both sides."""
    out = []
    for genre, source in genres.items():
        found = _resolve_root(source)
        if found is None:
            logger.warning("text genre %s skipped: no files match %s/{%s}", genre, source.root, ",".join(source.files))
            continue
        root, files = found
        docs = _source_documents(root, files, source)
        sides = {s: docs.filter(functools.partial(_in_split, split=s)) for s in SPLITS}
        short = [s for s, d in sides.items() if not _has_chars(d, MIN_GENRE_CHARS)]
        if short:
            logger.warning(
                "text genre %s (%s) skipped: fewer than %d characters in its %s split",
                genre,
                root,
                MIN_GENRE_CHARS,
                " and ".join(short),
            )
            continue
        out.append((genre, root, sides))
    return out


def genre_corpora(split: Split, genres: Mapping[str, GenreSource] = GENRES) -> dict[str, Corpus]:
    """One corpus per available genre (in ``genres`` order), one side of the fixed split.

    A genre whose files are missing, or with fewer than :data:`MIN_GENRE_CHARS` characters on
    either side of the split, is left out with a logged warning (both sides then have the same
    genres). Only document names are read here, plus enough text to check the sizes.
    """
    return {
        genre: Corpus(name=f"{genre} ({root}), {split} split", documents=sides[split], genre=genre)
        for genre, root, sides in _available(genres)
    }


def _docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 200:
                out.append(doc)
    return "\n\n".join(out)


def _stdlib_docstrings(split: Split) -> Corpus:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = Documents(
        (p.name, text) for p in sorted(stdlib.glob("*.py")) if _in_split(p.name, split) and (text := _docstrings(p))
    )
    if not len(docs):
        raise MlakitError(f"no text found for the default {split} corpus (no genre files, no stdlib sources)")
    return Corpus(
        name=f"standard-library docstrings ({stdlib}), {split} split", documents=docs, genre="stdlib-docstrings"
    )


def default_corpus(split: Split, genres: Mapping[str, GenreSource] = GENRES) -> Corpus:
    """The built-in corpus, one side of the fixed calibration/evaluation split: a mix of genres.

    Windows drawn from it (:func:`token_windows`) take an equal share from every genre. Without
    any genre on this machine, the standard library's docstrings (a single genre).

    Raises:
        MlakitError: no text at all.
    """
    available = _available(genres)
    if not available:
        logger.warning("no built-in text genre found (install python3-doc debian-policy): using stdlib docstrings")
        return _stdlib_docstrings(split)
    parts = tuple(
        Corpus(name=f"{g} ({root}), {split} split", documents=sides[split], genre=g) for g, root, sides in available
    )
    used = ", ".join(f"{g} ({root})" for g, root, _ in available)
    return Corpus(name=f"genre mix of {used}, {split} split", parts=parts)


def files_corpus(paths: Sequence[str]) -> Corpus:
    """User-supplied text (``--text``, ``--calibration-text``), one genre named ``files``.

    A directory stands for its ``*.txt``, ``*.md`` and ``*.rst`` files, recursively, sorted.

    Raises:
        MlakitError: naming the file: missing, a directory without text files, unreadable, not
            UTF-8, or empty.
    """
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in USER_TEXT_SUFFIXES)
            if not found:
                raise MlakitError(f"{p}: a directory with no {', '.join(USER_TEXT_SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise MlakitError(f"{p}: no such file or directory")
    docs = []
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as e:
            raise MlakitError(f"{f}: cannot read: {e.strerror}") from e
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise MlakitError(f"{f} is not UTF-8 text (byte {e.start})") from e
        if not text.strip():
            raise MlakitError(f"{f}: file is empty")
        docs.append((str(f), text))
    return Corpus(name="files: " + ", ".join(paths), documents=tuple(docs), genre="files")


def _pieces(text: str) -> Iterator[str]:
    """``text + "\\n\\n"`` in consecutive pieces of about :data:`PIECE_CHARS`, cut at blank lines."""
    piece: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        piece.append(para)
        size += len(para) + 2
        if size >= PIECE_CHARS:
            yield "\n\n".join(piece) + "\n\n"
            piece, size = [], 0
    if piece:
        yield "\n\n".join(piece) + "\n\n"


def _genre_ids(corpus: Corpus, tokenizer: Any, need: int) -> list[int]:
    """The first ``need`` tokens of one genre's documents, concatenated (fewer if it runs out).

    Tokenizes only as far as needed, piece by piece.
    """
    ids: list[int] = []
    for _, text in corpus.documents:
        for piece in _pieces(text):
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
            if len(ids) >= need:
                return ids[:need]
    return ids


def _cut(corpus: Corpus, ids: list[int], num_windows: int, seq_len: int) -> torch.Tensor:
    n = min(num_windows, len(ids) // seq_len)
    if n == 0:
        raise MlakitError(f"{corpus.name}: too short: {len(ids)} tokens, need at least {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)  # [n, T]


def genre_windows(
    corpus: Corpus, tokenizer: Any, *, num_windows_per_genre: int, seq_len: int
) -> dict[str, torch.Tensor]:
    """Windows of every genre of ``corpus`` separately, for per-genre evaluation.

    Returns:
        genre -> ``[N, seq_len]`` int64 token ids, the first ``N <= num_windows_per_genre``
        non-overlapping windows of that genre's text (fewer only if it runs out; logged).

    Raises:
        MlakitError: a genre's text is shorter than one window.
    """
    if num_windows_per_genre < 1 or seq_len < 1:
        raise MlakitError(f"num_windows_per_genre={num_windows_per_genre}, seq_len={seq_len}: both must be at least 1")
    out: dict[str, torch.Tensor] = {}
    for part in corpus.genres:
        ids = _genre_ids(part, tokenizer, num_windows_per_genre * seq_len)
        out[part.genre] = _cut(part, ids, num_windows_per_genre, seq_len)
        if len(out[part.genre]) < num_windows_per_genre:
            logger.warning(
                "%s: only %d windows of %d tokens (asked %d)",
                part.name,
                len(out[part.genre]),
                seq_len,
                num_windows_per_genre,
            )
    return out


def token_windows(corpus: Corpus, tokenizer: Any, *, num_windows: int, seq_len: int) -> torch.Tensor:
    """Tokenize the corpus and cut it into non-overlapping windows, round robin over its genres.

    Window ``i`` comes from genre ``i % G`` (its ``i // G``-th window), so every prefix is
    balanced across genres; a single-genre corpus gives its first ``num_windows`` windows.

    Returns:
        ``[N, seq_len]`` int64 token ids, ``N <= num_windows``: fewer (with a warning) only when
        a genre runs out of text, cut where that genre's turn would come.

    Raises:
        MlakitError: a genre's text is shorter than one window (naming it, with its token count).
    """
    if num_windows < 1 or seq_len < 1:
        raise MlakitError(f"num_windows={num_windows}, seq_len={seq_len}: both must be at least 1")
    parts = corpus.genres
    g = len(parts)
    per_genre = []
    for i, part in enumerate(parts):
        share = len(range(i, num_windows, g))  # windows i, i+G, i+2G, ... of the result
        if share == 0:
            per_genre.append(torch.empty(0, seq_len, dtype=torch.long))
            continue
        per_genre.append(_cut(part, _genre_ids(part, tokenizer, share * seq_len), share, seq_len))
    n = 0
    while n < num_windows and n // g < len(per_genre[n % g]):
        n += 1
    if n < num_windows:
        logger.warning("%s: only %d windows of %d tokens available (asked %d)", corpus.name, n, seq_len, num_windows)
    return torch.stack([per_genre[i % g][i // g] for i in range(n)])  # [N, T]
