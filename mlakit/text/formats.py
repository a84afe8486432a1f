"""Plain text out of two documentation formats shipped by Debian: man pages (troff) and GNU info.

Neither reader aims at a faithful rendering; they aim at *prose a language model would see*:
the words, option names and code samples of a page, without formatting requests. Both are pure
Python and fast (a man page is one pass of a few regexes), because a corpus lists thousands.

- :func:`man_to_text`: troff ``man`` (and the common ``mdoc``) macros -> text. Comments,
  macro definitions, conditionals and layout requests are dropped; headings (``.SH``, ``.SS``,
  ``.Sh``) become their own lines; the text arguments of font macros (``.B``, ``.BR``, ``.IP``...)
  are kept; escapes (``\\fB``, ``\\-``, ``\\(em``, ``\\e``...) become the characters they print.
- :func:`info_nodes`: an info file -> ``(node name, text)`` pairs, split on the ``\\x1f``
  separator, without node header lines, tag tables and indirect tables.
"""

from __future__ import annotations

import re

# \(xx and \[name] glyphs that occur in prose; any other glyph is dropped
_GLYPHS: dict[str, str] = {
    "em": "\u2014",
    "en": "\u2013",
    "hy": "-",
    "mi": "-",
    "bu": "\u2022",
    "aq": "'",
    "dq": '"',
    "lq": "\u201c",
    "rq": "\u201d",
    "oq": "\u2018",
    "cq": "\u2019",
    "co": "\u00a9",
    "rg": "\u00ae",
    "tm": "\u2122",
    "mu": "\u00d7",
    "di": "\u00f7",
    "de": "\u00b0",
    "+-": "\u00b1",
    ">=": "\u2265",
    "<=": "\u2264",
    "!=": "\u2260",
    "->": "\u2192",
    "<-": "\u2190",
    "rs": "\\",
    "ti": "~",
    "ha": "^",
    "ga": "`",
    "aa": "\u00b4",
    "sl": "/",
    "ba": "|",
    "or": "|",
    "lh": "\u261c",
    "rh": "\u261e",
    "Fo": "\u00ab",
    "Fc": "\u00bb",
    "ss": "\u00df",
}
# \*x / \*(xx / \*[name] strings that man page generators (pod2man, help2man) define
_STRINGS: dict[str, str] = {
    "lq": "\u201c",
    "rq": "\u201d",
    'L"': '"',
    'R"': '"',
    "C`": '"',
    "C'": '"',
    "--": "-",
    "Aq": "'",
    "R": "\u00ae",
    "Tm": "\u2122",
    "PI": "pi",
}

_ESCAPE = re.compile(
    r"""\\(?:
        (?P<comment>["#].*)                       # \" comment to end of line
      | f(?:\[[^\]]*\]|\(..|.)                    # font: \fB \f(CW \f[BI]
      | s[-+]?(?:\d|\(\d\d|\[\d+\])               # point size: \s-1 \s0
      | \((?P<glyph2>..)                          # glyph \(em
      | \[(?P<glyphn>[^\]]*)\]                    # glyph \[em]
      | \*(?:\((?P<str2>..)|\[(?P<strn>[^\]]*)\]|(?P<str1>.))  # string \*(lq
      | [nk](?:\(..|\[[^\]]*\]|.)                 # number register, mark
      | [hvwlLNbBDoSxXCRZ]'[^']*'                 # motions, width, lines, \N'..'
      | (?P<char>.)                               # one-character escapes
    )""",
    re.VERBOSE,
)
_CHAR_ESCAPES: dict[str, str] = {
    "e": "\\",
    "\\": "\\",
    "-": "-",
    " ": " ",
    "~": " ",
    "0": " ",
    "t": "\t",
    "'": "\u00b4",
    "`": "`",
    ".": ".",
}


def _unescape(line: str) -> str:
    def sub(m: re.Match[str]) -> str:
        if m["comment"] is not None:
            return ""
        glyph = m["glyph2"] or m["glyphn"]
        if glyph is not None:
            return _GLYPHS.get(glyph, "")
        name = m["str2"] or m["strn"] or m["str1"]
        if name is not None:
            return _STRINGS.get(name, "")
        if m["char"] is not None:
            return _CHAR_ESCAPES.get(m["char"], "")  # \& \| \^ \, \/ \% \c ...: print nothing
        return ""

    return _ESCAPE.sub(sub, line)


def _args(rest: str) -> list[str]:
    """troff arguments: space-separated, ``"double quoted"`` groups, ``""`` a literal quote inside one.

    Escapes stay in place (``\\ `` does not split), to be resolved by :func:`_unescape`.
    """
    args: list[str] = []
    cur: list[str] = []
    quoted = started = False
    i = 0
    while i < len(rest):
        c = rest[i]
        if c == "\\" and i + 1 < len(rest):
            cur.append(rest[i : i + 2])
            started = True
            i += 2
            continue
        if c == '"':
            if quoted and rest[i + 1 : i + 2] == '"':
                cur.append('"')
                i += 1
            elif quoted:
                quoted = False
            elif not started:
                quoted = started = True
            else:
                cur.append(c)
        elif c in " \t" and not quoted:
            if started:
                args.append("".join(cur))
            cur, started = [], False
        else:
            cur.append(c)
            started = True
        i += 1
    if started:
        args.append("".join(cur))
    return args


# man macros whose arguments are text in alternating fonts, printed without spaces between them
_ALTERNATING = frozenset({"BR", "RB", "BI", "IB", "IR", "RI"})
# man/mdoc macros whose arguments are printed as text, separated by spaces
_TEXT = frozenset({"B", "I", "R", "SM", "SB", "UR", "MT", "OP"})
_PARAGRAPH = frozenset({"PP", "LP", "P", "Pp", "Lp", "TP", "TQ", "HP", "sp", "Sp", "br", "Bl", "El", "Bd", "Ed"})
_HEADING = frozenset({"SH", "SS", "Sh", "Ss"})
# mdoc macros dropped from the middle of a line (their arguments stay)
_MDOC_INLINE = frozenset(
    "Ad An Ar Cd Cm Dv Er Ev Fa Fd Fn Ft Ic Li Nd Pa Va Vt Em Sy Ql Dq Sq Qq Pq Bq Brq Aq Ux No Ns "
    "Oo Oc Op Ao Ac Bo Bc Do Dc So Sc Qo Qc Po Pc It Tn Lk Mt Cx Cy Ox Bx Nx Fx At Bsx St Xo Xc".split()
)


def _mdoc(macro: str, args: list[str], name: str) -> str:
    """One mdoc line (``.Op Fl c Ar cipher`` -> ``[-c cipher]``); ``name`` stands in for a bare ``.Nm``."""
    out: list[str] = []
    dash = bracket = False
    toks = [macro, *args]
    i = 0
    while i < len(toks):
        tok = toks[i]
        if tok == "Fl":
            dash = True
        elif tok == "Nm":
            if i + 1 >= len(toks) or toks[i + 1] in _MDOC_INLINE:
                out.append(name)
        elif tok == "Op":
            out.append("[")
            bracket = True
        elif tok == "Xr" and i + 2 < len(toks):
            out.append(f"{toks[i + 1]}({toks[i + 2]})")
            i += 2
        elif tok not in _MDOC_INLINE:
            out.append(("-" if dash else "") + tok)
            dash = False
        i += 1
    if dash:
        out.append("-")
    text = " ".join(out).replace("[ ", "[")
    return text + "]" if bracket else text


_COMMENT = re.compile(r'(?<!\\)\\".*')
_CONTINUATION = re.compile(r"(?<!\\)\\\n")  # a backslash ending a line joins it to the next


def man_to_text(source: str) -> str:
    """Plain text of a troff man page (``man`` or ``mdoc`` macros), for language-model text.

    Raises nothing: unknown requests are dropped, unknown escapes print nothing.
    """
    out: list[str] = []
    skip_depth = 0  # inside a conditional body \{ ... \}
    in_macro_def = False  # inside .de NAME ... ..
    mdoc_name = ""
    for raw in _CONTINUATION.sub("", source).splitlines():
        if in_macro_def:
            in_macro_def = raw.strip() != ".."
            continue
        if skip_depth:
            skip_depth += raw.count("\\{") - raw.count("\\}")
            continue
        if raw.startswith((".", "'")):
            body = raw[1:].lstrip()
            if body.startswith(('\\"', "#")) or not body:
                continue
            macro, _, rest = _COMMENT.sub("", body).partition(" ")
            macro, rest = macro.strip(), rest.strip()
            if macro in ("de", "de1", "am", "ig"):
                in_macro_def = True
                continue
            if macro.startswith(("if", "ie", "el")):
                skip_depth = raw.count("\\{") - raw.count("\\}")
                continue
            if macro in _HEADING:
                out.append("\n" + _unescape(" ".join(_args(rest))).strip() + "\n")
            elif macro in _PARAGRAPH:
                out.append("")
            elif macro in _ALTERNATING:
                out.append("".join(_unescape(a) for a in _args(rest)))
            elif macro in _TEXT:
                out.append(" ".join(_unescape(a) for a in _args(rest)))
            elif macro == "IP":
                tag = _args(rest)[:1]
                out.extend(["", _unescape(tag[0])] if tag else [""])
            elif macro == "Nm" and rest and not mdoc_name:
                mdoc_name = _unescape(_args(rest)[0])
                out.append(mdoc_name)
            elif macro in _MDOC_INLINE or macro in ("Nm", "Fl", "Xr"):
                out.append(_mdoc(macro, [_unescape(a) for a in _args(rest)], mdoc_name))
            continue  # every other request (.TH .nf .RS .IX .ds .so ...) prints nothing we want
        out.append(_unescape(raw))
    text = "\n".join(line.rstrip() for line in out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


_NODE_HEADER = re.compile(r"^File: [^,]*,\s+Node: ([^,\t\n]+)")
# makeinfo's in-band markers for images and index entries: \0\b[image src=...\0\b]
_INFO_MARKER = re.compile(r"\x00\x08\[.*?\x00\x08\]", re.DOTALL)


def info_nodes(source: str) -> list[tuple[str, str]]:
    """``(node name, text)`` for every node of one info file (or one piece of a split manual).

    Nodes are separated by ``\\x1f``; the first line of a node (``File: x.info, Node: Top,
    Next: ...``) is navigation, not text, and is dropped. The preamble before the first
    separator, the indirect table (``Indirect:``), the tag table and ``Local Variables``
    blocks hold no prose and are skipped.
    """
    nodes: list[tuple[str, str]] = []
    for chunk in source.split("\x1f")[1:]:
        chunk = chunk.lstrip("\n\f")
        header, _, body = chunk.partition("\n")
        m = _NODE_HEADER.match(header)
        if m is None:  # Tag Table:, Indirect:, End Tag Table, Local Variables
            continue
        text = _INFO_MARKER.sub("", body).strip()
        if text:
            nodes.append((m[1].strip(), text + "\n"))
    return nodes
