"""Whole runs of the real command line on corpora a real user has: the same transcript reached
twice, transcripts that cannot be read, outputs that cannot be written, interruptions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.synth_corpus import make_corpus
from helpers import cli_args, events, fill_disk, named, run_cli, start_cli, wait_for_event

pytestmark = pytest.mark.timeout(120)


def test_a_transcript_reached_twice_is_aligned_once_and_the_run_ends(tmp_path):
    corpus = tmp_path / "corpus"
    files = make_corpus(corpus, [3, 4, 5], subdirs=2)
    out = tmp_path / "out"
    log = tmp_path / "run.jsonl"
    # The folder, a folder inside it and a file inside it: each transcript is one job.
    r = run_cli(cli_args([corpus, corpus / "part1", files[0]], out, "--log-json", str(log)), tmp_path, timeout=40)
    assert r.returncode == 0, r.stderr[-3000:]
    evs = events(log)
    assert not named(evs, "handler_failed"), named(evs, "handler_failed")
    done = sorted(e["file"] for e in named(evs, "file_done"))
    assert done == sorted(p.relative_to(corpus).as_posix() for p in files)
    assert "3 done, 0 failed" in r.stderr


def test_a_transcript_that_cannot_be_read_is_counted_failed_and_the_rest_are_done(tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, [3, 4])
    (corpus / "dangling.cha").symlink_to(corpus / "gone.cha")
    out = tmp_path / "out"
    log = tmp_path / "run.jsonl"
    r = run_cli(cli_args(corpus, out, "--log-json", str(log)), tmp_path, timeout=90)
    assert r.returncode == 1, r.stderr[-3000:]
    failed = named(events(log), "file_failed")
    assert [e["file"] for e in failed] == ["dangling.cha"]
    assert "dangling.cha" in failed[0]["reason"] and "\n" not in failed[0]["reason"]
    assert {e["file"] for e in named(events(log), "file_done")} == {"f000.cha", "f001.cha"}
    assert "2 done, 1 failed" in r.stderr
    assert "failed: dangling.cha:" in r.stderr


def test_an_output_folder_on_a_full_disk_fails_each_file_with_one_line_and_a_rerun_after_freeing_it_finishes(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    corpus = tmp_path / "corpus"
    files = make_corpus(corpus, [20, 20, 20])
    out = mnt / "out"
    log = tmp_path / "run.jsonl"
    args = cli_args(corpus, out, "--log-json", str(log), "--max-attempts", "3")
    try:
        out.mkdir()
        fill_disk(mnt)
        r = run_cli(args, tmp_path, timeout=60)
        assert r.returncode == 1, r.stderr[-3000:]
        evs = events(log)
        failed = named(evs, "file_failed")
        assert sorted(e["file"] for e in failed) == ["f000.cha", "f001.cha", "f002.cha"]  # each once, not retried
        for e in failed:
            assert e["kind"] == "output"
            assert str(out / e["file"]) in e["reason"] and "No space left" in e["reason"], e["reason"]
        assert not named(evs, "file_quarantined")
        assert "Traceback" not in r.stderr
        assert not [p for p in mnt.rglob("*.tmp")]
        (mnt / "filler").unlink()
        log.unlink()
        r = run_cli(args, tmp_path, timeout=60)
        assert r.returncode == 0, r.stderr[-3000:]
        assert len(named(events(log), "file_done")) == len(files)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_rerun_removes_temporary_files_a_killed_writer_left_and_keeps_a_live_writers(tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, [3, 4], subdirs=2)
    out = tmp_path / "out"
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that is no longer running
    stale = out / "part0" / f".f000.cha.{gone.pid}.0123abcd.tmp"
    live = out / "part1" / f".f001.cha.{os.getpid()}.4567cdef.tmp"
    mine = out / "part1" / ".notes.tmp"  # not ours by name
    for p in (stale, live, mine):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("half a transcript")
        os.utime(p, (1e9, 1e9))
    log = tmp_path / "run.jsonl"
    r = run_cli(cli_args(corpus, out, "--dry-run"), tmp_path, timeout=60)
    assert r.returncode == 0 and stale.exists()  # a dry run changes nothing
    r = run_cli(cli_args(corpus, out, "--log-json", str(log)), tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not stale.exists()
    assert live.exists() and mine.exists()
    assert [e["path"] for e in named(events(log), "stale_temp_removed")] == [str(stale)]


def test_a_dry_run_of_a_corpus_with_bad_files_lists_them_and_writes_nothing(tmp_path):
    corpus = tmp_path / "corpus"
    files = make_corpus(corpus, [3, 4])
    (corpus / "ghost.cha").write_text(files[0].read_text().replace("@Media:\tf000", "@Media:\tghost"))
    (corpus / "dangling.cha").symlink_to(corpus / "gone.cha")
    (corpus / "nobegin.cha").write_text(files[1].read_text().replace("@Begin\n", ""))
    out = tmp_path / "out"
    r = run_cli(cli_args(corpus, out, "--dry-run"), tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    rows = {ln.split("│")[2].strip(): ln for ln in r.stdout.splitlines()
            if ".cha" in ln and ln.split("│")[2].strip()}  # a reason may wrap onto a row of its own
    assert set(rows) == {"f000.cha", "f001.cha", "ghost.cha", "dangling.cha", "nobegin.cha"}
    assert all("failed" in rows[n] for n in ("ghost.cha", "dangling.cha", "nobegin.cha"))
    assert "failed" not in rows["f000.cha"] and "failed" not in rows["f001.cha"]
    assert not out.exists()


def test_a_transcript_the_reader_refuses_fails_at_intake_with_its_line_and_the_rest_are_done(tmp_path):
    corpus = tmp_path / "corpus"
    files = make_corpus(corpus, [3, 4])
    (corpus / "nobegin.cha").write_text(files[1].read_text().replace("@Begin\n", ""))
    log = tmp_path / "run.jsonl"
    r = run_cli(cli_args(corpus, tmp_path / "out", "--log-json", str(log)), tmp_path, timeout=90)
    assert r.returncode == 1, r.stderr[-3000:]
    evs = events(log)
    failed = named(evs, "file_failed")
    assert [(e["file"], e["attempt"]) for e in failed] == [("nobegin.cha", 0)]  # no worker tried it
    assert "nobegin.cha" in failed[0]["reason"] and "@Begin" in failed[0]["reason"]
    assert {e["file"] for e in named(evs, "file_done")} == {"f000.cha", "f001.cha"}
    assert not any(e.get("file") == "nobegin.cha" for e in named(evs, "file_admitted"))


@pytest.mark.parametrize("command", [["report"], ["ratios"], ["ratios", "--reset"]])
def test_report_and_ratios_on_a_file_that_is_not_a_telemetry_store_say_so_in_one_line(tmp_path, command):
    junk = tmp_path / "junk.sqlite"
    junk.write_text("not a database\n" * 100)
    r = run_cli([sys.executable, "-m", "supervisor.cli", *command, "--telemetry", str(junk)], tmp_path, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert str(junk) in line and "not a database" in line


def test_report_of_an_output_folder_reads_its_log(tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, [3])
    out = tmp_path / "out"
    assert run_cli(cli_args(corpus, out), tmp_path, timeout=60).returncode == 0
    r = run_cli([sys.executable, "-m", "supervisor.cli", "report", str(out)], tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "f000.cha" in r.stdout
    r = run_cli([sys.executable, "-m", "supervisor.cli", "report", str(corpus)], tmp_path, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(corpus) in r.stderr and "batchalign-supervise.log.jsonl" in r.stderr


def test_an_output_folder_that_holds_the_corpus_is_a_clear_usage_error(tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, [3])
    for out in (corpus, tmp_path):
        r = run_cli(cli_args(corpus, out), tmp_path, timeout=60)
        assert r.returncode == 2, r.stderr
        assert f"{out}: the output folder holds the corpus" in r.stderr and "--in-place" in r.stderr


def test_recordings_named_beside_their_transcripts_are_not_taken_for_transcripts(tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, [3, 4])
    out = tmp_path / "out"
    log = tmp_path / "run.jsonl"
    named_files = sorted(corpus.iterdir())  # what `batchalign-supervise corpus/* -o out` names
    r = run_cli(cli_args(named_files, out, "--log-json", str(log)), tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not named(events(log), "file_failed")
    assert sorted(e["file"] for e in named(events(log), "file_done")) == ["f000.cha", "f001.cha"]


def test_status_finds_a_supervisor_run_with_its_own_state_dir(tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, [30] * 6)
    out = tmp_path / "out"
    log = tmp_path / "run.jsonl"
    p = start_cli(cli_args(corpus, out, "--log-json", str(log), "--state-dir", str(tmp_path / "elsewhere")), tmp_path,
                  BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_CPU_SECONDS_PER_AUDIO_SECOND="0.5")
    try:
        wait_for_event(log, "file_started", timeout=60)
        for target in (str(p.pid), str(out)):
            r = run_cli([sys.executable, "-m", "supervisor.cli", "status", target, "--json"], tmp_path, timeout=30)
            assert r.returncode == 0, r.stderr
            got = json.loads(r.stdout)
            assert got["pid"] == p.pid and got["out"] == str(out)
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=30)


def test_a_log_that_cannot_be_written_is_a_one_line_usage_error(tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, [3])
    r = run_cli(cli_args(corpus, tmp_path / "out", "--log-json", "/proc/no/run.jsonl"), tmp_path, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "/proc/no" in r.stderr.strip().splitlines()[-1] and "--log-json" in r.stderr


def test_linked_folders_are_followed_once_each_and_a_link_back_up_the_tree_cannot_loop(tmp_path):
    from supervisor.corpus import find_transcripts

    corpus, shared = tmp_path / "corpus", tmp_path / "shared"
    make_corpus(corpus / "a", [3])
    make_corpus(shared, [3, 4])
    (corpus / "sessions").symlink_to(shared, target_is_directory=True)  # a shared folder linked in
    (corpus / "a" / "up").symlink_to(corpus, target_is_directory=True)  # a link back up: no loop
    (corpus / "again").symlink_to(shared, target_is_directory=True)  # the same folder twice: one job each
    found = find_transcripts([corpus], out_root=tmp_path / "out", in_place=False)
    rels = sorted(c.cha.relative_to(corpus).as_posix() for c in found)
    assert rels == ["a/f000.cha", "again/f000.cha", "again/f001.cha"]


def test_a_media_folder_that_does_not_exist_is_a_one_line_usage_error(tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, [3])
    r = run_cli(cli_args(corpus, tmp_path / "out", "--media-dir", str(tmp_path / "nowhere")), tmp_path, timeout=40)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"media folder {tmp_path / 'nowhere'}" in r.stderr and "no such folder" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
