#!/usr/bin/env python3
"""Check an .srt file against the ground truth written by make_test_video.py.

    check_srt.py SUBTITLES.srt TRUTH.json [--fps 2] [--tolerance SECONDS] [--allow-extra]

What passes:
  - TEXT: every expected cue is matched by one cue of the file (each file cue matches at most
    one expected cue) whose text equals the expected text after normalisation (Unicode NFKC,
    lower case, ALL whitespace removed: the OCR model often drops the space between words)
    up to an edit distance (Levenshtein, insert/delete/substitute = 1) of at most 10 % of the
    normalised expected text's length, rounded down (e.g. 1 wrong letter in 10-19 letters,
    2 in 20-29).
  - TIMING: the matched cue's start and its end are each within the tolerance of the
    expected start and end. The tolerance is 1/fps + 0.25 s (0.75 s at the default 2 fps):
    frames are sampled every 1/fps s, so a change is seen up to one interval late, and
    0.25 s covers frame-time rounding and OCR missing a frame at a cue's edge.
  - NO EXTRAS: the file has no cue that matches no expected cue (spurious text), unless
    --allow-extra is given.
Prints a per-cue report; exits 0 when everything passes, 1 when anything fails, 2 when a
file cannot be read.
"""
import argparse
import json
import os
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from textutil import levenshtein, parse_srt, squash  # noqa: E402

TEXT_TOLERANCE = 0.10


def main():
    ap = argparse.ArgumentParser(description="check an .srt against ground-truth cues")
    ap.add_argument("srt")
    ap.add_argument("truth")
    ap.add_argument("--fps", type=float, default=2.0, help="the fps the frames were sampled at (default 2)")
    ap.add_argument("--tolerance", type=float, default=None,
                    help="seconds allowed on each start and end (default 1/fps + 0.25)")
    ap.add_argument("--allow-extra", action="store_true", help="do not fail on cues that match nothing")
    args = ap.parse_args()
    tol = args.tolerance if args.tolerance is not None else 1.0 / args.fps + 0.25

    try:
        with open(args.srt, encoding="utf-8") as f:
            got = parse_srt(f.read())
        with open(args.truth) as f:
            expected = json.load(f)["cues"]
    except (OSError, ValueError, KeyError) as e:
        print(f"check_srt: cannot read input: {e}", file=sys.stderr)
        return 2

    print(f"check_srt: {len(expected)} expected cues, {len(got)} in {args.srt}; "
          f"timing tolerance {tol:.3f} s (fps {args.fps:g}), text tolerance "
          f"{TEXT_TOLERANCE:.0%} edits after case/whitespace normalisation")
    used = set()
    failures = 0
    for n, exp in enumerate(expected, 1):
        want = squash(exp["text"])
        limit = int(TEXT_TOLERANCE * len(want))
        cands = []
        for i, g in enumerate(got):
            if i in used:
                continue
            d = levenshtein(want, squash(g["text"]))
            if d <= limit:
                terr = max(abs(g["start"] - exp["start"]), abs(g["end"] - exp["end"]))
                cands.append((terr, d, i))
        head = f"  cue {n} [{exp['start']:.2f}-{exp['end']:.2f}] {exp['text']!r}"
        if not cands:
            # say what came closest, to make the failure readable
            near = min(((levenshtein(want, squash(g["text"])), g) for g in got),
                       key=lambda x: x[0], default=None)
            hint = (f"; closest text {near[1]['text']!r} at {near[1]['start']:.2f}-{near[1]['end']:.2f}, "
                    f"{near[0]} edits > {limit} allowed") if near else ""
            print(f"FAIL{head}: no cue with this text{hint}")
            failures += 1
            continue
        terr, d, i = min(cands)
        used.add(i)
        g = got[i]
        ds, de = g["start"] - exp["start"], g["end"] - exp["end"]
        ok = abs(ds) <= tol and abs(de) <= tol
        status = "ok  " if ok else "FAIL"
        print(f"{status}{head}: got [{g['start']:.2f}-{g['end']:.2f}] {g['text']!r} "
              f"(start {ds:+.2f} s, end {de:+.2f} s, {d} edit{'s' if d != 1 else ''})")
        if not ok:
            failures += 1
    extras = [g for i, g in enumerate(got) if i not in used]
    for g in extras:
        tag = "note" if args.allow_extra else "FAIL"
        print(f"{tag}  extra cue [{g['start']:.2f}-{g['end']:.2f}] {g['text']!r} matches no expected cue")
    if not args.allow_extra:
        failures += len(extras)
    if failures:
        print(f"check_srt: FAILED ({failures} problem{'s' if failures != 1 else ''})")
        return 1
    print(f"check_srt: PASSED ({len(expected)} cues)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
