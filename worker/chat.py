"""CHAT reader for what alignment needs, and a writer that changes only what alignment owns.

The reader keeps the original text and the position of every line, so the writer can copy all bytes
it does not own (headers, other tiers, line endings, a missing final newline) and touch only the
utterance bullet of each aligned main tier and its ``%wor`` tier. ``render_chat(chat, {})`` gives
back ``chat.text`` exactly.

The words to align are the words a speaker actually uttered, written as TalkBank writes them in
``%wor``: retraced words, fillers (``&-um``), fragments (``&+fr``) and nonwords (``&~gaga``) count;
annotations, events, untranscribed material, pauses, terminators, linkers and omitted words do not.
"""

from __future__ import annotations

import gc
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ChatError",
    "ChatFile",
    "MediaRef",
    "UttAlignment",
    "Utterance",
    "WordTime",
    "parse_chat",
    "read_chat",
    "render_chat",
    "spoken_text",
]


class ChatError(ValueError):
    """A transcript that cannot be read safely; ``str()`` is one ``path:line: message`` line."""

    def __init__(self, path: str, line: int | None, message: str):
        self.path = str(path)
        self.line = line
        # One line per error keeps logs and the worker protocol's error field parseable.
        self.message = " ".join(str(message).split())
        super().__init__(self._format())

    def _format(self) -> str:
        path = " ".join(self.path.split()) or "<string>"
        if self.line is None:
            return f"{path}: {self.message}"
        return f"{path}:{self.line}: {self.message}"

    def __str__(self) -> str:
        return self._format()

    def __reduce__(self):
        # The default reduce would call ChatError(formatted) and fail; workers pickle errors.
        return (type(self), (self.path, self.line, self.message))


@dataclass
class MediaRef:
    """The ``@Media`` header: ``name, type[, flags...]`` (flags such as ``unlinked``, ``missing``)."""

    name: str
    type: str | None
    flags: list[str] = field(default_factory=list)


@dataclass
class Utterance:
    """One main tier with what alignment needs; line numbers are 1-based and include continuations."""

    index: int
    speaker: str
    line: int
    end_line: int
    text: str
    bullet: tuple[int, int] | None
    words: list[str]
    dependent: list[tuple[str, int, int]] = field(default_factory=list)
    terminator: str | None = None
    # Where the utterance bullet sits: (0-based line, start column, end column); the writer
    # replaces exactly those characters.
    _bullet_at: tuple[int, int, int] | None = field(default=None, repr=False, compare=False)


@dataclass
class ChatFile:
    """A parsed transcript; ``text`` is the decoded original the writer copies from."""

    path: str
    text: str
    headers: list[tuple[str, str, int]]
    languages: list[str]
    participants: dict[str, str]
    media: MediaRef | None
    utterances: list[Utterance]

    @property
    def has_timings(self) -> bool:
        """True when every utterance with words carries a bullet tied to the media.

        ``@Media: ..., unlinked`` declares that the bullets (if any) were never checked against the
        recording, so such a file counts as untimed; so does a file with no spoken utterance.
        """
        if self.media is not None and "unlinked" in self.media.flags:
            return False
        spoken = [u for u in self.utterances if u.words]
        return bool(spoken) and all(u.bullet is not None for u in spoken)


@dataclass
class WordTime:
    """A word's time in ms; ``None`` times mean the aligner could not place it."""

    word: str
    start_ms: int | None
    end_ms: int | None


@dataclass
class UttAlignment:
    """New timing for one utterance: ``words`` matches ``Utterance.words`` one for one."""

    bullet: tuple[int, int] | None
    words: list[WordTime]


# --------------------------------------------------------------------------------------------
# Lexical patterns, compiled once: a 10 MB transcript must parse in linear time.

_LINE_SPLIT_RE = re.compile(r"(\r\n|\n|\r)")
_HEADER_RE = re.compile(r"@([^:\t]*?)\s*(?::[ \t]?(.*))?$", re.S)
_BULLET_SCAN_RE = re.compile(r"\x15([^\x15]*)(\x15?)")
_BULLET_BODY_RE = re.compile(r"(?:%(?:snd|mov):\"[^\"]*\"_)?(\d+)_(\d+)-?")
_BRACKET_RE = re.compile(r"\[[^\]]*\]?")
_PLAIN_WORD_RE = re.compile(r"'?[^\W\d_]+(?:['-][^\W\d_]+)*'?")
_PAUSE_RE = re.compile(r"\((?:\.{1,3}|\d+(?::\d+)?(?:\.\d*)?|\d*\.\d+)\)")
# Symbols that mark prosody, overlap or voice quality inside or around a word; not letters spoken.
_CA_RE = re.compile(r"[⌈⌉⌊⌋]\d*|[↑↓⇗↗→↘⇘∞≋≡∙∆∇°◉▁▔☺♋∲§∾↻Ἡ∬Ϋ⁎‡„“”‹›ˈˌ^<>≠]")
_HAS_WORD_CHAR_RE = re.compile(r"\w")
_SPLIT_LIST_RE = re.compile(r"[,\s]+")

_UNTRANSCRIBED = frozenset({"xxx", "yyy", "www", "xx", "yy"})
_SPOKEN_AMP = ("&-", "&+", "&~")
_TERMINATORS = frozenset(
    {
        ".", "?", "!",
        "+...", "+..?", "+!?", "+/.", "+/?", "+//.", "+//?", "+/??", "+.", "+\"/.", "+\".",
        "≋", "≈", "+≋", "+≈", "⇗", "↗", "→", "↘", "⇘",
    }
)
_NOT_WORDS = _TERMINATORS | {",", "(.)", "(..)", "(...)", "+,", "+<", "+\"", "+^", "++", "„", "‡"}
_MORPHOLOGY_TIERS = frozenset({"%mor", "%gra", "%umor", "%ugra"})


def _clean_word(token: str) -> str | None:
    """The %wor form of one main-tier token, or None when the token is not a spoken word."""
    if token[0] == "+" or token[0] == "0":
        return None  # linkers, terminators like +/. and +..., omitted words 0the
    if token[0] == "&":
        if not token.startswith(_SPOKEN_AMP):
            return None  # events &=laughs, interposed &*INV:yeah, long events &{l=...
    elif token[0] == "(" and _PAUSE_RE.fullmatch(token):
        return None
    word = _CA_RE.sub("", token)
    at = word.find("@")
    stem, suffix = (word, "") if at < 0 else (word[:at], word[at:])
    if ":" in stem:
        stem = stem.replace(":", "")  # lengthening; the colon of a form marker (@s:hun) stays
    word = (stem + suffix).rstrip(",")
    if not word or not _HAS_WORD_CHAR_RE.search(word):
        return None
    if stem.lower() in _UNTRANSCRIBED:
        return None
    return word


def _extract_words(text: str) -> tuple[list[str], str | None]:
    """Spoken words in order and the utterance terminator, from main-tier text without bullets."""
    if "[" in text:
        # [/] [//] [<] [= x] [* m] [+ gram] [: repl] ...: markup; the spoken word before it stays.
        text = _BRACKET_RE.sub(" ", text)
    tokens = text.split()
    words: list[str] = []
    append = words.append
    plain = _PLAIN_WORD_RE.fullmatch
    for token in tokens:
        # Fast path first: nearly every token in a real transcript is a plain word.
        if token.isalpha() or plain(token):
            if token not in _UNTRANSCRIBED:
                append(token)
        elif token not in _NOT_WORDS:
            word = _clean_word(token)
            if word is not None:
                append(word)
    terminator = tokens[-1] if tokens and tokens[-1] in _TERMINATORS else None
    return words, terminator


_SHORTENING_RE = re.compile(r"\([^)]*\)")


def spoken_text(word: str) -> str:
    """What an acoustic model should hear for a %wor word: ``&-um`` -> ``um``,
    ``(be)cause`` -> ``cause``, ``fiu@s:hun`` -> ``fiu``, ``ice+cream`` -> ``ice cream``."""
    if word.startswith(_SPOKEN_AMP):
        word = word[2:]
    at = word.find("@")
    if at > 0:
        word = word[:at]
    word = _SHORTENING_RE.sub("", word)
    return " ".join(word.replace("+", " ").replace("_", " ").split())


# --------------------------------------------------------------------------------------------
# Reader


def _split_lines(text: str) -> tuple[list[str], list[str]]:
    """Line contents and their separators ("" for a last line without newline), split only on
    CR, LF and CRLF: str.splitlines would also break on characters CHAT text may contain."""
    parts = _LINE_SPLIT_RE.split(text)
    contents = parts[0::2]
    seps = parts[1::2]
    seps.append("")
    if contents and contents[-1] == "" and len(contents) > 1:
        contents.pop()
        seps.pop()
    return contents, seps


def _parse_bullet(path: str, lineno: int, body: str) -> tuple[int, int]:
    """Times of one bullet body: ``START_END`` in ms, also CLAN's older ``%snd:"name"_START_END``
    form and its trailing ``-`` skip flag, so older corpora still read."""
    m = _BULLET_BODY_RE.fullmatch(body)
    if m is None:
        raise ChatError(path, lineno, f"broken bullet {body!r}: expected START_END in ms")
    start, end = int(m.group(1)), int(m.group(2))
    if start > end:
        raise ChatError(path, lineno, f"broken bullet {start}_{end}: start after end")
    return start, end


def _parse_media(value: str) -> MediaRef:
    parts = [p.strip() for p in value.split(",")]
    parts = [p for p in parts if p]
    name = parts[0].strip('"') if parts else ""
    type_ = parts[1] if len(parts) > 1 else None
    return MediaRef(name=name, type=type_, flags=parts[2:])


def _parse_participants(value: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for entry in value.split(","):
        fields = entry.split()
        if fields:
            out[fields[0]] = fields[-1] if len(fields) > 1 else ""
    return out


def _tier_name(line: str) -> tuple[str, str] | None:
    """Split '*SPK:rest' / '%tier:rest' / '@Name:rest' at the first colon; None if no valid name."""
    colon = line.find(":")
    if colon <= 1:
        return None
    name = line[1:colon]
    if " " in name or "\t" in name:
        return None
    return name, line[colon + 1 :]


def parse_chat(text: str, path: str = "<string>") -> ChatFile:
    """Parse decoded CHAT text; raises ChatError (with the line) for what would make alignment unsafe."""
    # The parse allocates hundreds of thousands of small acyclic objects on a large transcript;
    # pausing the cyclic collector avoids repeated full-heap scans (about 40% of the time).
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        return _parse(text, str(path))
    finally:
        if paused:
            gc.enable()


def _parse(text: str, path: str) -> ChatFile:
    contents, _seps = _split_lines(text)
    if contents and contents[0].startswith("\ufeff"):
        contents[0] = contents[0][1:]  # the BOM stays in chat.text; only line parsing skips it
    n = len(contents)

    headers: list[tuple[str, str, int]] = []
    utterances: list[Utterance] = []
    participants: dict[str, str] = {}
    participants_seen = False
    languages: list[str] = []
    media: MediaRef | None = None
    began = ended = False

    # The tier being read: kind ("@", "*", "%" or "" for none), its first and last 0-based line,
    # its name and, for headers and main tiers, its text pieces (continuations without the TAB).
    kind = ""
    first = last = 0
    name = ""
    pieces: list[str] = []
    # Dependent tiers attach to the last main tier only while no header intervenes.
    owner: Utterance | None = None

    i = 0
    while i <= n:
        line = contents[i] if i < n else None
        if line is not None:
            if not line:
                i += 1
                continue
            c = line[0]
            if c == "\t" or (c == " " and line.isspace()):
                if line.isspace():
                    i += 1
                    continue  # blank lines are not CHAT but harmless: copied, attached to nothing
                if not kind:
                    raise ChatError(path, i + 1, "continuation line (starting with TAB) follows no tier")
                if kind != "%":
                    pieces.append(line[1:])
                last = i
                i += 1
                continue

        # A new tier starts (or the file ends): close the one being read.
        if kind == "*":
            owner = _finish_main(path, name, first, last, pieces, contents, len(utterances))
            utterances.append(owner)
        elif kind == "%":
            assert owner is not None
            owner.dependent.append((name, first + 1, last + 1))
        elif kind == "@":
            owner = None
            value = " ".join(" ".join(pieces).split())
            headers.append((name, value, first + 1))
            if name == "Participants":
                participants.update(_parse_participants(value))
                participants_seen = True
            elif name == "Languages":
                languages = [x for x in _SPLIT_LIST_RE.split(value) if x]
            elif name == "Media":
                media = _parse_media(value)
        if line is None:
            break

        lineno = i + 1
        if ended:
            raise ChatError(path, lineno, "content after @End")
        first = last = i
        c = line[0]
        if c == "*":
            if not began:
                raise ChatError(path, lineno, "main tier before @Begin (missing @Begin)")
            split = _tier_name(line)
            if split is None:
                raise ChatError(path, lineno, "malformed main tier: expected '*SPK:<TAB>text'")
            name, rest = split
            if not rest.startswith("\t"):
                raise ChatError(path, lineno, f"main tier *{name}: needs a TAB after the colon")
            if name not in participants:
                if participants_seen:
                    raise ChatError(path, lineno, f"speaker {name} is not in @Participants")
                raise ChatError(path, lineno, f"speaker {name}: no @Participants header before this line")
            kind, pieces = "*", [rest[1:]]
        elif c == "%":
            split = _tier_name(line)
            if split is None:
                raise ChatError(path, lineno, "malformed dependent tier: expected '%tier:<TAB>text'")
            if owner is None:
                raise ChatError(path, lineno, f"dependent tier %{split[0]} does not follow a main tier")
            kind, name = "%", "%" + split[0]
        elif c == "@":
            m = _HEADER_RE.match(line)
            name = m.group(1) if m else line[1:]
            if name == "Begin":
                if began:
                    raise ChatError(path, lineno, "second @Begin")
                began = True
            elif name == "End":
                if not began:
                    raise ChatError(path, lineno, "@End without @Begin")
                ended = True
            kind, pieces = "@", [(m.group(2) or "") if m else ""]
        else:
            raise ChatError(path, lineno, f"unexpected line start {c!r}: expected @, *, % or TAB")
        i += 1

    if not began:
        raise ChatError(path, None, "missing @Begin")
    if not ended:
        raise ChatError(path, n, "missing @End at end of file")

    return ChatFile(
        path=path,
        text=text,
        headers=headers,
        languages=languages,
        participants=participants,
        media=media,
        utterances=utterances,
    )


def _finish_main(
    path: str, speaker: str, first: int, last: int, pieces: list[str], contents: list[str], index: int
) -> Utterance:
    """Bullets, text and words of one main tier; pieces are the text after '*SPK:\\t' or the TAB."""
    joined = pieces[0] if len(pieces) == 1 else " ".join(pieces)
    bullet: tuple[int, int] | None = None
    bullet_at: tuple[int, int, int] | None = None
    if "\x15" in joined:
        bullets: list[tuple[int, int, int, tuple[int, int]]] = []  # line, start col, end col, times
        clean: list[str] = []
        for k, piece in enumerate(pieces):
            li = first + k
            # Columns count from the start of the full line ('*SPK:\t' or '\t' precede the piece).
            offset = len(contents[li]) - len(piece)
            pos = 0
            for m in _BULLET_SCAN_RE.finditer(piece):
                if not m.group(2):
                    raise ChatError(path, li + 1, "broken bullet: unterminated \\x15")
                bullets.append((li, offset + m.start(), offset + m.end(), _parse_bullet(path, li + 1, m.group(1))))
                clean.append(piece[pos : m.start()])
                pos = m.end()
            clean.append(piece[pos:])
        joined = " ".join(clean)
        li, start, end, times = bullets[-1]
        # Only a bullet with nothing but space after it times the utterance; others are internal.
        if not contents[li][end:].strip() and not any(contents[j].strip() for j in range(li + 1, last + 1)):
            bullet, bullet_at = times, (li, start, end)

    text = " ".join(joined.split())
    words, terminator = _extract_words(text)
    return Utterance(
        index=index,
        speaker=speaker,
        line=first + 1,
        end_line=last + 1,
        text=text,
        bullet=bullet,
        words=words,
        dependent=[],
        terminator=terminator,
        _bullet_at=bullet_at,
    )


def _line_of_offset(data: bytes, offset: int) -> int:
    """1-based line of a byte offset, counting CR, LF and CRLF as the parser does."""
    prefix = data[:offset]
    return prefix.count(b"\n") + prefix.count(b"\r") - prefix.count(b"\r\n") + 1


def read_chat(path: str | os.PathLike[str]) -> ChatFile:
    """Read and parse a transcript as strict UTF-8 (a BOM is allowed and kept for the writer)."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ChatError(
            str(path),
            _line_of_offset(data, exc.start),
            f"not valid UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start}",
        ) from None
    return parse_chat(text, str(path))


# --------------------------------------------------------------------------------------------
# Writer


def _check_times(what: str, start: int, end: int) -> None:
    if not (isinstance(start, int) and isinstance(end, int)) or start < 0 or start > end:
        raise ValueError(f"{what}: invalid times {start!r}_{end!r}")


def _bullet(start: int, end: int) -> str:
    return f"\x15{start}_{end}\x15"


def _wor_line(utt: Utterance, al: UttAlignment) -> str:
    parts: list[str] = []
    for word, wt in zip(utt.words, al.words):
        if wt.start_ms is None or wt.end_ms is None:
            parts.append(word)
        else:
            _check_times(f"utterance {utt.index} word {word!r}", wt.start_ms, wt.end_ms)
            parts.append(f"{word} {_bullet(wt.start_ms, wt.end_ms)}")
    if utt.terminator:
        parts.append(utt.terminator)
    return "%wor:\t" + " ".join(parts)


def render_chat(chat: ChatFile, alignments: Mapping[int, UttAlignment]) -> str:
    """The transcript with new bullets and %wor tiers for the aligned utterances, all else verbatim.

    The utterance bullet is replaced where it stands (or appended at the end of the main tier).
    The ``%wor`` tier replaces an existing one in place; otherwise it goes after the main tier's
    %mor/%gra tiers and before any other dependent tier, where batchalign writes it. Each word is
    written in its ``Utterance.words`` form so %wor always matches the main tier; the engine's
    spelling in ``WordTime.word`` is not trusted for that.
    """
    if not alignments:
        return chat.text
    contents, seps = _split_lines(chat.text)
    lines = [c + s for c, s in zip(contents, seps)]
    out: list[str] = []
    pos = 0  # next 0-based line to copy

    for idx in sorted(alignments):
        if not 0 <= idx < len(chat.utterances):
            raise ValueError(f"alignment for utterance {idx}: the file has {len(chat.utterances)}")
        utt = chat.utterances[idx]
        al = alignments[idx]
        if len(al.words) != len(utt.words):
            raise ValueError(
                f"utterance {idx} (line {utt.line}): {len(al.words)} word times for {len(utt.words)} words"
            )
        first, last_main = utt.line - 1, utt.end_line - 1
        out.extend(lines[pos:first])

        main = lines[first : last_main + 1]
        if al.bullet is not None:
            _check_times(f"utterance {idx} bullet", *al.bullet)
            new = _bullet(*al.bullet)
            if utt._bullet_at is not None:
                li, start, end = utt._bullet_at
                k = li - first
                main[k] = contents[li][:start] + new + contents[li][end:] + seps[li]
            else:
                main[-1] = contents[last_main].rstrip(" \t") + " " + new + seps[last_main]
        out.extend(main)
        pos = last_main + 1

        if not utt.words:
            continue
        wor = _wor_line(utt, al)
        deps = utt.dependent
        has_wor = any(name == "%wor" for name, _, _ in deps)
        insert_after = 0
        if not has_wor:
            while insert_after < len(deps) and deps[insert_after][0] in _MORPHOLOGY_TIERS:
                insert_after += 1
        written = False
        for k, (name, d_first, d_last) in enumerate(deps):
            if not has_wor and k == insert_after:
                out.append(wor + seps[pos - 1])
                written = True
            out.extend(lines[pos : d_first - 1])  # blank lines between tiers, if any
            if name == "%wor":
                if not written:
                    out.append(wor + seps[d_last - 1])
                    written = True
            else:
                out.extend(lines[d_first - 1 : d_last])
            pos = d_last
        if not written:
            out.append(wor + seps[pos - 1])

    out.extend(lines[pos:])
    return "".join(out)
