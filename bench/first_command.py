"""A newcomer's first command, timed: README's first set-up block pasted into a fresh clone.

    python -m bench.first_command [--repo PATH] [--keep]

Clones the repository (default: this checkout's) into a new temporary folder, runs the first
``sh`` block under README's "Set up" with fresh, empty XDG data/state/cache folders and Hugging Face
home (so no model, pip cache or earlier state helps), then checks that every example transcript came
back with real ``%wor`` tiers (word bullets, not the synthetic engine's marked timings). Prints the
wall time of the whole block and of each command in it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def first_setup_block(readme: str) -> str:
    section = readme[readme.index("## Set up"):]
    m = re.search(r"```sh\n(.*?)\n```", section, re.S)
    if m is None:
        raise SystemExit("README has no ```sh block under '## Set up'")
    return m.group(1).strip()


def check_outputs(clone: Path) -> tuple[int, int]:
    """(transcripts aligned, words with bullets); raises when an output is missing or made up."""
    corpus = sorted((clone / "examples" / "corpus").glob("*.cha"))
    words = 0
    for cha in corpus:
        out = clone / "aligned" / cha.name
        text = out.read_text(encoding="utf-8")
        if "synthetic timings" in text:
            raise SystemExit(f"{out}: synthetic timings, not an alignment")
        wor = [ln for ln in text.splitlines() if ln.startswith("%wor:")]
        mains = [ln for ln in text.splitlines() if ln.startswith("*")]
        if not wor or len(wor) != len(mains):
            raise SystemExit(f"{out}: {len(wor)} %wor tiers for {len(mains)} utterances")
        words += sum(len(re.findall(r"\x15?\d+_\d+\x15?", ln)) for ln in wor)
    return len(corpus), words


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=str(ROOT), help="repository to clone (default: this checkout)")
    ap.add_argument("--keep", action="store_true", help="leave the clone and its folders behind")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="first-command-"))
    clone = work / "fresh"
    subprocess.run(["git", "clone", "-q", args.repo, str(clone)], check=True)
    block = first_setup_block((clone / "README.md").read_text(encoding="utf-8"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHALIGN_SUPERVISE_", "HF_", "XDG_"))}
    for var, name in (("XDG_DATA_HOME", "data"), ("XDG_STATE_HOME", "state"), ("XDG_CACHE_HOME", "cache"),
                      ("XDG_CONFIG_HOME", "config"), ("HF_HOME", "hf")):
        (work / name).mkdir()
        env[var] = str(work / name)
    steps = [s.strip() for s in block.split("&&")]
    print(f"clone: {clone}\ncommand: {block}\n")
    t0 = time.monotonic()
    for step in steps:
        s0 = time.monotonic()
        proc = subprocess.run(["bash", "-c", step], cwd=clone, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        took = time.monotonic() - s0
        print(f"{took:7.1f} s  {step}")
        if proc.returncode != 0:
            print(proc.stdout[-4000:])
            raise SystemExit(f"step failed with exit {proc.returncode}: {step}")
    total = time.monotonic() - t0
    files, words = check_outputs(clone)
    print(f"\nwhole block: {total:.1f} s ({total / 60:.1f} min) on {os.cpu_count()} cores; "
          f"{files} transcripts aligned, {words} word bullets in %wor")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if total < 360 else 1)


if __name__ == "__main__":
    main()
