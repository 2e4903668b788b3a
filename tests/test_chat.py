"""CHAT reader and minimal-diff writer (worker/chat.py) and atomic writes (worker/output.py)."""

from __future__ import annotations

import difflib
import os
import pickle
import re
import stat
import time
from pathlib import Path

import pytest

from worker import output
from worker.chat import (
    ChatError,
    UttAlignment,
    WordTime,
    parse_chat,
    read_chat,
    render_chat,
    spoken_text,
)
from worker.output import atomic_write_bytes, atomic_write_text

pytestmark = pytest.mark.timeout(60)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CHAT_DIR = SHARED / "chat"
SYNTH_DIR = SHARED / "synth"
BAD_DIR = Path(__file__).resolve().parent / "data" / "bad_chat"

_WOR_ITEM_RE = re.compile(r"(\S+)(?: \x15(\d+)_(\d+)\x15)?")


def _cha_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent: the shared TalkBank/synthetic data is not checked out beside the repo")
    files = sorted(folder.glob("*.cha"))
    assert files, f"no .cha files in {folder}"
    return files


def _shared(name: str) -> Path:
    path = CHAT_DIR / name
    if not path.is_file():
        pytest.skip(f"{path} is absent: the shared TalkBank data is not checked out beside the repo")
    return path


def _wor_tiers(text: str) -> list[tuple[int, list[tuple[str, tuple[int, int] | None]]]]:
    """(1-based line, [(word, times)]) for every %wor line, terminator included as a timeless item."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("%wor:\t"):
            items = [
                (m.group(1), (int(m.group(2)), int(m.group(3))) if m.group(2) else None)
                for m in _WOR_ITEM_RE.finditer(line[len("%wor:\t") :])
            ]
            out.append((n, items))
    return out


def _alignment_from_wor(utt, items) -> UttAlignment:
    words = [(w, t) for w, t in items if w != utt.terminator]
    return UttAlignment(
        bullet=utt.bullet,
        words=[WordTime(w, t[0] if t else None, t[1] if t else None) for w, t in words],
    )


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("folder", [CHAT_DIR, SYNTH_DIR], ids=["chat", "synth"])
def test_render_without_alignments_is_byte_identical(folder, tmp_path):
    for path in _cha_files(folder):
        chat = read_chat(path)
        rendered = render_chat(chat, {})
        assert rendered == chat.text
        out = tmp_path / path.name
        atomic_write_text(out, rendered)
        assert out.read_bytes() == path.read_bytes(), path.name


@pytest.mark.parametrize("folder", [CHAT_DIR, SYNTH_DIR], ids=["chat", "synth"])
def test_existing_wor_tiers_match_extracted_words(folder):
    """Every real %wor tier lists exactly the words the reader extracts, then the terminator."""
    checked = 0
    for path in _cha_files(folder):
        chat = read_chat(path)
        by_line = {dep[1]: utt for utt in chat.utterances for dep in utt.dependent if dep[0] == "%wor"}
        for line, items in _wor_tiers(chat.text):
            utt = by_line[line]
            expected = utt.words + ([utt.terminator] if utt.terminator else [])
            assert [w for w, _ in items] == expected, (path.name, line)
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("folder", [CHAT_DIR, SYNTH_DIR], ids=["chat", "synth"])
def test_rerendering_existing_wor_times_reproduces_file(folder):
    """Writing a file's own %wor times back gives the same bytes: the %wor format is TalkBank's."""
    for path in _cha_files(folder):
        chat = read_chat(path)
        aligned = {}
        tiers = dict(_wor_tiers(chat.text))
        for utt in chat.utterances:
            for name, first, _last in utt.dependent:
                if name == "%wor":
                    aligned[utt.index] = _alignment_from_wor(utt, tiers[first])
        assert render_chat(chat, aligned) == chat.text, path.name


def test_synth_inputs_without_wor_get_the_original_wor_back():
    """Strip %wor from the synthetic files (the alignment input), render the true times: same file."""
    for path in _cha_files(SYNTH_DIR):
        original = path.read_text(encoding="utf-8")
        tiers = _wor_tiers(original)
        stripped = "".join(l for l in original.splitlines(keepends=True) if not l.startswith("%wor:"))
        chat = parse_chat(stripped, str(path))
        assert len(chat.utterances) == len(tiers) == 1
        utt = chat.utterances[0]
        assert utt.dependent == []
        assert render_chat(chat, {0: _alignment_from_wor(utt, tiers[0][1])}) == original


# ---------------------------------------------------------------------------------------------
# Reader


def test_words_disfluency():
    chat = read_chat(_shared("eng_disfluency.cha"))
    assert [u.words for u in chat.utterances] == [
        ["um", "I", "was", "going", "to", "the", "store"],
        ["and", "uh", "she", "said", "hello"],
        ["I", "like", "I", "like", "beans"],  # <I like> [/]: retraced words were spoken
        ["he", "went", "to", "the", "to", "the", "to", "the", "park"],
        ["mm-hmm", "that's", "right"],
        ["the", "the", "dog"],
        ["cuz", "I", "wanted", "to", "go"],
        ["so", "I", "was", "like", "&-um", "yeah"],  # filler kept in its %wor form
        ["and", "he", "said", "he", "said", "he", "said", "goodbye"],
        ["'em", "all", "in", "the", "basket"],
    ]
    assert all(u.terminator == "." for u in chat.utterances)
    assert all(u.bullet is None for u in chat.utterances)
    assert chat.utterances[2].text == "I like <I like> [/] beans ."
    assert not chat.has_timings


def test_words_overlap_ca():
    chat = read_chat(_shared("eng_overlap_ca.cha"))
    assert [(u.speaker, u.words) for u in chat.utterances] == [
        ("PAR", ["so", "I", "was", "telling", "him", "about", "it"]),  # [>] dropped
        ("INV", ["yeah"]),  # +< linker and [<] dropped
        ("PAR", ["and", "&-uh", "he", "said", "that", "was", "fine"]),
        ("INV", ["mhm"]),
        ("PAR", []),  # www: untranscribed
        ("INV", ["so", "what", "happened", "next"]),
        ("PAR", ["well", "I", "went", "home"]),
        ("PAR", ["and", "then", "I", "told", "her"]),
        ("INV", ["oh", "really"]),  # <oh really> [<]
        ("PAR", ["yeah", "I", "told", "her", "everything"]),
    ]
    assert chat.participants == {"PAR": "Participant", "INV": "Investigator"}


def test_words_and_bullets_multi_speaker():
    chat = read_chat(_shared("eng_multi_speaker.cha"))
    u = chat.utterances
    assert u[0].bullet == (600, 2219)
    assert u[0].line == 10 and u[0].end_line == 10
    assert [x.words for x in u] == [
        ["wanna", "give", "me", "a", "kiss"],
        ["come", "on", "give", "me", "a", "kiss"],
        ["give", "your", "daddy", "a", "kiss"],
        ["mm", "nice", "fiu@s:hun"],  # (.) dropped, form marker kept
        ["nice", "fiu@s:hun"],
        ["yeah"],
        ["tape", "recorder"],
        ["that's", "the", "&-uh"],  # [>] and +/. dropped
        ["what's", "that"],  # <what's> [<]
        ["taperecorder", "over", "there"],  # +, linker dropped
        ["hm"],  # hm: lengthening cleaned
        ["do", "you", "have", "some", "nice", "little", "things", "to", "say", "to", "it"],
    ]
    assert u[7].terminator == "+/."
    assert u[-1].bullet == (15799, 17618)
    assert chat.has_timings
    assert chat.media is not None and (chat.media.name, chat.media.type, chat.media.flags) == (
        "eng_multi_speaker",
        "audio",
        [],
    )
    assert chat.languages == ["eng"]
    assert chat.participants == {"FAT": "Father", "CHI": "Target_Child", "MOT": "Mother"}
    assert ("Types", "long, toyplay, TD", 9) in chat.headers


def test_unlinked_has_no_timings():
    chat = read_chat(_shared("unlinked.cha"))
    assert chat.media is not None and chat.media.flags == ["unlinked"]
    assert chat.utterances[0].words == ["Um", "I", "like", "I", "like", "I", "like", "beans"]
    assert not chat.has_timings


def test_dependent_tiers_and_headers_yue():
    chat = read_chat(_shared("yue_hku_timed.cha"))
    utt = chat.utterances[2]
    assert utt.bullet == (2000, 18623)
    assert utt.dependent == [("%mor", 22, 22), ("%gra", 23, 23), ("%wor", 24, 24)]
    assert chat.utterances[3].words == ["gam2", "之後", "daam1", "咗", "屋企", "度"]  # original, not [: 返]
    assert chat.utterances[4].words == ["變", "咗", "個"] and chat.utterances[4].terminator == "+..."
    assert ("G", "CatRe", 35) in chat.headers
    assert chat.participants == {"PAR": "Participant", "INV": "Investigator"}


def test_markup_is_not_aligned():
    text = (
        "@Begin\n@Participants:\tCHI Target_Child\n"
        "*CHI:\t+\" &=laughs <I want> [//] I wan(t) 0the ⌈cookie⌉ [: cookies] [* m] (1.5) &+co\n"
        "\t&*MOT:yeah xxx yyy@s ↑no:: ice+cream fiu@s:hun &~gaga (.) [+ gram] +//. [+ bch]\n"
        "@End\n"
    )
    utt = parse_chat(text).utterances[0]
    assert utt.words == ["I", "want", "I", "wan(t)", "cookie", "&+co", "no", "ice+cream", "fiu@s:hun", "&~gaga"]
    assert utt.terminator == "+//."
    assert (utt.line, utt.end_line) == (3, 4)


def test_bullet_on_continuation_line_and_internal_bullets():
    text = (
        "@Begin\n@Participants:\tMOT Mother\n"
        "*MOT:\tlook \x15100_300\x15 at\n\tthat . \x15100_900\x15\n"
        "*MOT:\tand \x15100_300\x15 this .\n"
        "@End\n"
    )
    chat = parse_chat(text)
    a, b = chat.utterances
    assert a.bullet == (100, 900) and a.words == ["look", "at", "that"] and a.text == "look at that ."
    assert b.bullet is None and b.words == ["and", "this"]  # an internal bullet does not time the utterance


def test_crlf_bom_and_missing_final_newline(tmp_path):
    text = "\ufeff@UTF8\r\n@Begin\r\n@Participants:\tCHI Target_Child\r\n*CHI:\tball . \x1510_20\x15\r\n@End"
    path = tmp_path / "x.cha"
    path.write_bytes(text.encode("utf-8"))
    chat = read_chat(path)
    assert chat.text == text and chat.utterances[0].bullet == (10, 20)
    assert render_chat(chat, {}) == text
    out = render_chat(chat, {0: UttAlignment((5, 30), [WordTime("ball", 5, 30)])})
    assert out == (
        "\ufeff@UTF8\r\n@Begin\r\n@Participants:\tCHI Target_Child\r\n*CHI:\tball . \x155_30\x15\r\n"
        "%wor:\tball \x155_30\x15 .\r\n@End"
    )


def test_parse_speed_10mb():
    head = "@UTF8\n@Begin\n@Languages:\teng\n@Participants:\tCHI Target_Child, MOT Mother\n"
    body = (
        "*MOT:\tyou want <some more> [/] some more cookies &-um (.) ? \x15100_2000\x15\n"
        "%mor:\tpro|you v|want qn|some qn|more n|cookie-PL ?\n"
        "*CHI:\tmore cookie [: cookies] &=laughs .\n%com:\treaches for the plate\n"
    )
    text = head + body * (10_000_000 // len(body)) + "@End\n"
    t0 = time.process_time()
    chat = parse_chat(text)
    elapsed = time.process_time() - t0
    assert len(chat.utterances) > 100_000
    assert chat.utterances[0].words == ["you", "want", "some", "more", "some", "more", "cookies", "&-um"]
    assert elapsed < 6.0, f"parsing 10 MB took {elapsed:.2f} s of CPU"


def test_spoken_text():
    assert spoken_text("&-um") == "um"
    assert spoken_text("&+fr") == "fr"
    assert spoken_text("(be)cause") == "cause"
    assert spoken_text("fiu@s:hun") == "fiu"
    assert spoken_text("ice+cream") == "ice cream"
    assert spoken_text("mm-hmm") == "mm-hmm"


# ---------------------------------------------------------------------------------------------
# Errors

BAD_CASES = {
    "no_begin.cha": (4, "@Begin"),
    "no_end.cha": (8, "@End"),
    "unknown_speaker.cha": (8, "FAT"),
    "bullet_not_numeric.cha": (7, "bullet"),
    "bullet_reversed.cha": (8, "start after end"),
    "bullet_unterminated.cha": (7, "unterminated"),
    "bullet_on_continuation.cha": (8, "bullet"),
    "main_no_tab.cha": (8, "TAB"),
    "orphan_dependent.cha": (7, "%com"),
    "dependent_after_header.cha": (9, "%mor"),
    "content_after_end.cha": (9, "@End"),
    "bad_encoding.cha": (8, "UTF-8"),
}


def test_bad_files_all_covered():
    assert sorted(p.name for p in BAD_DIR.glob("*.cha")) == sorted(BAD_CASES)


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_chat_raises_with_file_and_line(name):
    line, fragment = BAD_CASES[name]
    path = BAD_DIR / name
    with pytest.raises(ChatError) as info:
        read_chat(path)
    err = info.value
    msg = str(err)
    assert "\n" not in msg
    assert msg.startswith(f"{path}:{line}: "), msg
    assert err.path == str(path) and err.line == line
    assert fragment in err.message
    assert isinstance(err, ValueError)


def test_chat_error_format_and_pickle():
    err = ChatError("a.cha", None, "missing\n@Begin")
    assert str(err) == "a.cha: missing @Begin"
    again = pickle.loads(pickle.dumps(ChatError("a.cha", 3, "x")))
    assert (again.path, again.line, again.message, str(again)) == ("a.cha", 3, "x", "a.cha:3: x")


def test_missing_begin_without_main_tier():
    with pytest.raises(ChatError, match=r"^<string>:2: @End without @Begin"):
        parse_chat("@UTF8\n@End\n")
    with pytest.raises(ChatError, match=r"^f\.cha: missing @Begin"):
        parse_chat("", "f.cha")


# ---------------------------------------------------------------------------------------------
# Writer


def _new_alignments(chat, shift=7):
    """Made-up times for every utterance with words: the bullet spans the words."""
    out = {}
    for utt in chat.utterances:
        if not utt.words:
            continue
        base = 100_000 + 10_000 * utt.index
        words = [WordTime(w, base + 100 * k + shift, base + 100 * k + 90) for k, w in enumerate(utt.words)]
        if len(words) > 2:
            words[1] = WordTime(words[1].word, None, None)  # unplaced word: written without a bullet
        out[utt.index] = UttAlignment((base, base + 100 * len(words)), words)
    return out


def test_render_yue_replaces_wor_without_duplication():
    chat = read_chat(_shared("yue_hku_timed.cha"))
    alignments = _new_alignments(chat)
    rendered = render_chat(chat, alignments)
    assert all(u.words for u in chat.utterances)

    assert rendered.count("%wor:") == len(chat.utterances)
    again = parse_chat(rendered, chat.path)
    assert len(again.utterances) == len(chat.utterances)
    for old, new in zip(chat.utterances, again.utterances):
        assert new.words == old.words and new.speaker == old.speaker and new.text == old.text
        names = [d[0] for d in new.dependent]
        al = alignments[old.index]
        assert new.bullet == al.bullet
        assert names.count("%wor") == 1
        # %wor sits where yue (and batchalign) put it: after %mor/%gra, before other tiers.
        assert names == ["%mor", "%gra", "%wor"]
        wor_line = rendered.splitlines()[new.dependent[2][1] - 1]
        items = _WOR_ITEM_RE.findall(wor_line[len("%wor:\t") :])
        assert [w for w, _, _ in items] == old.words + [old.terminator]
        for (_w, start, end), wt in zip(items, al.words):
            if wt.start_ms is None:
                assert (start, end) == ("", "")
            else:
                assert (int(start), int(end)) == (wt.start_ms, wt.end_ms)

    # Idempotent: aligning the output again gives the same output.
    assert render_chat(again, alignments) == rendered


def test_render_changes_only_owned_lines():
    chat = read_chat(_shared("fra_geneva_timed.cha"))
    alignments = _new_alignments(chat)
    rendered = render_chat(chat, alignments)
    old_lines = chat.text.splitlines(keepends=True)
    new_lines = rendered.splitlines(keepends=True)
    main_lines = {chat.utterances[i].line for i in alignments}
    sm = difflib.SequenceMatcher(a=old_lines, b=new_lines, autojunk=False)
    for op, a0, a1, b0, b1 in sm.get_opcodes():
        if op == "equal":
            continue
        for k in range(a0, a1):
            assert k + 1 in main_lines, f"line {k + 1} changed: {old_lines[k]!r}"
        for line in new_lines[b0:b1]:
            assert line.startswith(("%wor:\t", "*")), line
    # Bullet replaced in place, and appended where the main tier had none.
    assert "*MOT:\tMarie descends de ta chaise ! \x15110000_110500\x15\n" in rendered
    assert "*MOT:\tnon . \x15100000_100100\x15\n" in rendered
    assert "*MOT:\txxx .\n" in rendered  # no words: untouched
    assert rendered.endswith("@End\n")


def test_render_leaves_bullet_when_alignment_has_none():
    chat = read_chat(_shared("eng_multi_speaker.cha"))
    utt = chat.utterances[0]
    al = UttAlignment(None, [WordTime(w, 700 + 10 * k, 705 + 10 * k) for k, w in enumerate(utt.words)])
    rendered = render_chat(chat, {0: al})
    lines = rendered.splitlines()
    assert lines[9] == chat.text.splitlines()[9]
    assert lines[10] == "%wor:\twanna \x15700_705\x15 give \x15710_715\x15 me \x15720_725\x15 a \x15730_735\x15 kiss \x15740_745\x15 ?"
    assert lines[11:] == chat.text.splitlines()[10:]


def test_render_rejects_mismatched_words():
    chat = read_chat(_shared("eng_multi_speaker.cha"))
    with pytest.raises(ValueError, match="word times"):
        render_chat(chat, {0: UttAlignment((1, 2), [WordTime("wanna", 1, 2)])})
    with pytest.raises(ValueError):
        render_chat(chat, {0: UttAlignment((5, 2), [WordTime(w, 1, 2) for w in chat.utterances[0].words])})
    with pytest.raises(ValueError):
        render_chat(chat, {99: UttAlignment(None, [])})


def test_render_wor_goes_before_other_dependent_tiers():
    text = (
        "@Begin\n@Participants:\tCHI Target_Child\n"
        "*CHI:\tmore juice .\n%mor:\tqn|more n|juice .\n%com:\tpoints\n%wor:\tmore juice .\n%sit:\tkitchen\n"
        "*CHI:\tno .\n%com:\tshakes head\n"
        "@End\n"
    )
    chat = parse_chat(text)
    out = render_chat(
        chat,
        {
            0: UttAlignment((0, 900), [WordTime("more", 0, 400), WordTime("juice", 450, 900)]),
            1: UttAlignment((1000, 1200), [WordTime("no", 1000, 1200)]),
        },
    )
    assert out == (
        "@Begin\n@Participants:\tCHI Target_Child\n"
        "*CHI:\tmore juice . \x150_900\x15\n%mor:\tqn|more n|juice .\n%com:\tpoints\n"
        "%wor:\tmore \x150_400\x15 juice \x15450_900\x15 .\n%sit:\tkitchen\n"
        "*CHI:\tno . \x151000_1200\x15\n%wor:\tno \x151000_1200\x15 .\n%com:\tshakes head\n"
        "@End\n"
    )


# ---------------------------------------------------------------------------------------------
# Atomic writes


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_creates_parents_and_keeps_bytes(tmp_path):
    target = tmp_path / "a" / "b" / "out.cha"
    atomic_write_text(target, "x\r\ny\n\u00e9")
    assert target.read_bytes() == "x\r\ny\n\u00e9".encode()
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert _leftovers(target.parent) == []


def test_atomic_write_preserves_permissions(tmp_path):
    target = tmp_path / "t.cha"
    target.write_text("old")
    os.chmod(target, 0o640)
    atomic_write_text(target, "new")
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
    assert target.read_text() == "new"


def test_atomic_write_follows_symlink(tmp_path):
    real = tmp_path / "real.cha"
    real.write_text("old")
    link = tmp_path / "link.cha"
    link.symlink_to(real)
    atomic_write_text(link, "new")
    assert link.is_symlink() and real.read_text() == "new"


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace"])
def test_atomic_write_failure_leaves_target_and_no_temp(tmp_path, monkeypatch, fail_at):
    target = tmp_path / "t.cha"
    target.write_text("old")
    seen: list[str] = []

    real_write = os.write

    def half_write(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))  # a partial file exists only under the temp name
        seen.extend(_leftovers(tmp_path))
        raise OSError(28, "No space left on device")

    def boom(*args, **kwargs):
        seen.extend(_leftovers(tmp_path))
        raise OSError(5, "I/O error")

    monkeypatch.setattr(output.os, fail_at, half_write if fail_at == "write" else boom)
    with pytest.raises(OSError):
        atomic_write_text(target, "new content " * 100)
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []
    assert len(seen) == 1 and seen[0].startswith(".t.cha.") and seen[0].endswith(".tmp")
    assert str(os.getpid()) in seen[0]
