"""The built-in genre mix: disjoint splits, skipped genres, balanced windows; user files and their errors."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import pytest
import torch

from mlakit.errors import MlakitError
from mlakit.text.corpus import (
    GenreSource,
    default_corpus,
    files_corpus,
    genre_corpora,
    genre_windows,
    token_windows,
)


class CharTokenizer:
    """One token per character (ids < 256): every character of the text is accounted for."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 256 for c in text]}

    def decode(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))


def _words(mark: str, i: int, n: int = 120) -> str:
    return " ".join(f"{mark}{i}w{j}" for j in range(n))


def _genres(root: Path) -> dict[str, GenreSource]:
    """Three small genres on disk (about 150-250k characters each) and one that is not there."""
    (root / "docs" / "sub").mkdir(parents=True)
    for i in range(60):
        (root / "docs" / ("sub" if i % 2 else "") / f"doc{i:02}.txt").write_text(_words("A", i) * 4)
    (root / "man" / "man1").mkdir(parents=True)
    (root / "man" / "de" / "man1").mkdir(parents=True)  # a localized page: never read
    for i in range(60):
        page = f".TH P{i} 1\n.SH NAME\np{i} \\- a page\n.SH DESCRIPTION\n.B {_words('B', i)}\n{_words('B', i) * 3}\n"
        (root / "man" / "man1" / f"p{i:02}.1.gz").write_bytes(gzip.compress(page.encode()))
    (root / "man" / "de" / "man1" / "x.1.gz").write_bytes(gzip.compress(b".SH NAME\nauf Deutsch\n"))
    (root / "man" / "man1" / "alias.1.gz").symlink_to(root / "man" / "man1" / "p00.1.gz")
    (root / "info").mkdir()
    for piece in (1, 2):
        nodes = "".join(
            f"\x1f\nFile: m.info,  Node: N{piece}-{i},  Up: Top\n\n{_words('C', i) * 4}\n" for i in range(30)
        )
        (root / "info" / f"m.info-{piece}.gz").write_bytes(gzip.compress(nodes.encode()))
    (root / "info" / "python3.info.gz").write_bytes(gzip.compress(b"\x1f\nFile: p.info,  Node: Top\n\nPython\n"))
    return {
        "docs": GenreSource(str(root / "doc*"), ("**/*.txt",)),
        "man": GenreSource(str(root / "man"), ("man1/*.gz",), reader="man"),
        "info": GenreSource(str(root / "info"), ("*.info-*.gz",), reader="info", exclude=("python*",)),
        "missing": GenreSource(str(root / "nowhere"), ("*.txt",)),
    }


def test_genres_split_disjoint_and_skip_missing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    genres = _genres(tmp_path)
    with caplog.at_level(logging.WARNING):
        cal, ev = genre_corpora("calibration", genres), genre_corpora("evaluation", genres)
    assert list(cal) == list(ev) == ["docs", "man", "info"]
    assert "missing" in caplog.text
    for g in cal:
        assert cal[g].names() and ev[g].names() and not set(cal[g].names()) & set(ev[g].names())
        assert cal[g].genre == g and "calibration" in cal[g].name
    everything = set(cal["man"].names()) | set(ev["man"].names())
    assert "man1/p00.1" in everything and "man1/alias.1" not in everything  # symlink to a listed page
    assert not any("de/" in n for n in everything)
    assert "m.info#N1-0" in set(cal["info"].names()) | set(ev["info"].names())
    assert not any(n.startswith("python") for n in cal["info"].names())
    name, text = ev["man"].documents[0]
    assert name.startswith("man1/p") and text.startswith("NAME\n") and ".B" not in text


def test_short_genre_is_skipped_and_fallback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "few").mkdir()
    (tmp_path / "few" / "a.txt").write_text("too little text")
    few = {"few": GenreSource(str(tmp_path / "few"), ("*.txt",))}
    with caplog.at_level(logging.WARNING):
        assert genre_corpora("evaluation", few) == {}
        corpus = default_corpus("evaluation", few)
    assert "fewer than" in caplog.text
    assert corpus.genre == "stdlib-docstrings" and "docstrings" in corpus.name and len(corpus.documents)


def test_mix_windows_round_robin_contiguous(tmp_path: Path) -> None:
    mix = default_corpus("calibration", _genres(tmp_path))
    assert [p.genre for p in mix.parts] == ["docs", "man", "info"]
    assert mix.name.startswith("genre mix of docs (") and "calibration split" in mix.name
    assert len(mix.documents) == sum(len(p.documents) for p in mix.parts)
    tok = CharTokenizer()
    seq = 300
    per_genre = genre_windows(mix, tok, num_windows_per_genre=3, seq_len=seq)
    assert {g: tuple(w.shape) for g, w in per_genre.items()} == {g: (3, seq) for g in ("docs", "man", "info")}
    w = token_windows(mix, tok, num_windows=8, seq_len=seq)
    assert w.shape == (8, seq)
    for i in range(8):  # window i is the (i // 3)-th window of genre i % 3
        assert torch.equal(w[i], list(per_genre.values())[i % 3][i // 3])
    marks = [tok.decode(row.tolist()) for row in w[:3]]
    assert "A" in marks[0] and "B" in marks[1] and "C" in marks[2]
    # consecutive windows of a genre are one contiguous run of its text
    docs_text = tok.decode(per_genre["docs"].flatten().tolist())
    assert docs_text == tok.decode(torch.cat([w[0], w[3], w[6]]).tolist())
    first_docs = "".join(t + "\n\n" for _, t in mix.parts[0].documents[:3])
    assert first_docs.startswith(docs_text[:2000])


def test_mix_windows_stop_at_short_genre(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mix = default_corpus("evaluation", _genres(tmp_path))
    tok = CharTokenizer()
    with pytest.raises(MlakitError, match=r"too short: \d+ tokens, need at least 10000000"):
        token_windows(mix, tok, num_windows=3, seq_len=10_000_000)
    # each document is followed by a blank line in a genre's token stream
    sizes = [sum(len(t) + 2 for _, t in p.documents) for p in mix.parts]
    seq = min(sizes) // 2  # the shortest genre has 2 windows, the others at least as many
    available = [s // seq for s in sizes]
    with caplog.at_level(logging.WARNING):
        w = token_windows(mix, tok, num_windows=30, seq_len=seq)
    # cut where the first genre to run out would have had its turn: still balanced
    assert len(w) == min(a * 3 + g for g, a in enumerate(available)) < 30
    assert "only" in caplog.text


def test_files_corpus_directory_and_errors(tmp_path: Path) -> None:
    (tmp_path / "d" / "b").mkdir(parents=True)
    (tmp_path / "d" / "z.md").write_text("zed")
    (tmp_path / "d" / "b" / "a.rst").write_text("ay")
    (tmp_path / "d" / "skip.bin").write_bytes(b"\x00\x01")
    c = files_corpus([str(tmp_path / "d")])
    assert c.genre == "files" and [Path(n).name for n in c.names()] == ["a.rst", "z.md"]
    with pytest.raises(MlakitError, match="nope.txt: no such file"):
        files_corpus([str(tmp_path / "nope.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(MlakitError, match="empty: a directory with no .txt, .md, .rst files"):
        files_corpus([str(tmp_path / "empty")])
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(MlakitError, match=r"latin1.txt is not UTF-8 text \(byte 3\)"):
        files_corpus([str(latin)])
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n")
    with pytest.raises(MlakitError, match="blank.txt: file is empty"):
        files_corpus([str(blank)])


def test_token_windows_single_genre_shape_and_short_text(tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("abc " * 100)
    w = token_windows(files_corpus([str(f)]), CharTokenizer(), num_windows=3, seq_len=50)
    assert w.shape == (3, 50) and w.dtype == torch.long
    with pytest.raises(MlakitError, match=r"files: .*t.txt: too short: 402 tokens, need at least 10000"):
        token_windows(files_corpus([str(f)]), CharTokenizer(), num_windows=1, seq_len=10_000)
