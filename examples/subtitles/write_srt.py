#!/usr/bin/env python3
"""gpuflow stage `write_srt` (CPU): turn per-frame OCR text into subtitle cues, write an .srt.

    write_srt.py OCR_JSON [--out PATH] [--max-distance 0.15] [--bridge 1]

OCR_JSON is the file the `ocr` worker wrote (its output's `ocr_file`): {"interval",
"duration", "frames": [{"t", "text"}, ...]}.

  1. Consecutive frames whose normalised text (case and whitespace ignored) is the same are
     one cue. OCR of one caption over a moving background jitters by a letter now and then
     ("luck"/"Iuck"), so "the same" allows an edit distance of up to --max-distance times the
     longer text's length (at least 1 character).
  2. A run of at most --bridge empty frames between two frames of the same text (a missed
     read) does not split the cue.
  3. Frames with no text are dropped; they only mark where cues end.
  4. A cue's text is its most frequent normalised reading, written as the reading of that
     form with the most spaces (the OCR model drops spaces, it does not add them).
  5. A cue starts halfway between its first frame and the frame before it, and ends halfway
     between its last frame and the frame after it (the true change happened somewhere in
     between; this halves the worst-case error to interval/2). At the ends of the video the
     missing neighbour is taken one interval away, clamped to [0, duration].

Writes PATH (default $GPUFLOW_JOB_DIR/subtitles.srt) and, to $GPUFLOW_OUTPUT,
{"srt": ABS_PATH, "cues": N}.
"""
import argparse
import collections
import json
import os
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from textutil import levenshtein, squash, srt_time  # noqa: E402


def similar(a, b, max_distance):
    if a == b:
        return True
    limit = max(1, int(max_distance * max(len(a), len(b))))
    return abs(len(a) - len(b)) <= limit and levenshtein(a, b) <= limit


def build_cues(frames, interval, duration, max_distance=0.15, bridge=1):
    frames = sorted(frames, key=lambda f: f["t"])
    texts = [(f.get("text") or "").strip() for f in frames]
    keys = [squash(t) for t in texts]

    # 2. bridge short runs of empty frames between similar readings
    i = 0
    while i < len(keys):
        if keys[i]:
            i += 1
            continue
        j = i
        while j < len(keys) and not keys[j]:
            j += 1
        if 0 < i and j < len(keys) and j - i <= bridge and similar(keys[i - 1], keys[j], max_distance):
            for k in range(i, j):
                keys[k], texts[k] = keys[i - 1], texts[i - 1]
        i = j

    # 1. group consecutive similar readings
    groups = []
    for idx, key in enumerate(keys):
        if not key:
            continue
        if groups and groups[-1][-1] == idx - 1:
            cur = groups[-1]
            mode = collections.Counter(keys[k] for k in cur).most_common(1)[0][0]
            if similar(mode, key, max_distance) or similar(keys[cur[-1]], key, max_distance):
                cur.append(idx)
                continue
        groups.append([idx])

    cues = []
    for g in groups:
        # most frequent reading; Counter.most_common keeps first-seen order among ties
        best = collections.Counter(keys[k] for k in g).most_common(1)[0][0]
        text = max((texts[k] for k in g if keys[k] == best), key=lambda t: t.count(" "))
        first, last = g[0], g[-1]
        t_first, t_last = frames[first]["t"], frames[last]["t"]
        prev_t = frames[first - 1]["t"] if first > 0 else max(0.0, t_first - interval)
        next_t = frames[last + 1]["t"] if last + 1 < len(frames) else t_last + interval
        if duration:
            next_t = min(next_t, max(duration, t_last))
        cues.append({
            "start": round((prev_t + t_first) / 2, 3),
            "end": round((t_last + next_t) / 2, 3),
            "text": text,
            "frames": len(g),
        })
    return cues


def main():
    ap = argparse.ArgumentParser(description="per-frame OCR text -> .srt")
    ap.add_argument("ocr_json")
    ap.add_argument("--out", default=None, help="default: $GPUFLOW_JOB_DIR/subtitles.srt")
    ap.add_argument("--max-distance", type=float, default=0.15,
                    help="edit distance, as a fraction of the text's length, still read as the same text (default 0.15)")
    ap.add_argument("--bridge", type=int, default=1,
                    help="longest run of empty frames inside one cue (default 1)")
    args = ap.parse_args()

    try:
        with open(args.ocr_json) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        print(f"write_srt: cannot read {args.ocr_json}: {e}", file=sys.stderr)
        sys.exit(2)
    frames = doc.get("frames") or []
    interval = float(doc.get("interval") or (1.0 / float(doc.get("fps") or 2)))
    duration = doc.get("duration")
    cues = build_cues(frames, interval, float(duration) if duration else None,
                      args.max_distance, args.bridge)

    job_dir = os.environ.get("GPUFLOW_JOB_DIR") or "."
    out = os.path.abspath(args.out or os.path.join(job_dir, "subtitles.srt"))
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        for n, c in enumerate(cues, 1):
            f.write(f"{n}\n{srt_time(c['start'])} --> {srt_time(c['end'])}\n{c['text']}\n\n")
    os.replace(out + ".tmp", out)

    result = json.dumps({"srt": out, "cues": len(cues)})
    dest = os.environ.get("GPUFLOW_OUTPUT")
    if dest:
        with open(dest, "w") as f:
            f.write(result)
    else:
        print(result)
    for c in cues:
        print(f"write_srt: {srt_time(c['start'])} --> {srt_time(c['end'])} [{c['frames']} frames] {c['text']}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
