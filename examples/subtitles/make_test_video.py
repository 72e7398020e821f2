#!/usr/bin/env python3
"""Make a short test video with burned-in subtitles of KNOWN text and timing.

Writes, into --out-dir (default: examples/subtitles/testdata):
  test.mp4          640x360, 25 fps, H.264, ~19 s: ffmpeg's moving `testsrc2` pattern with
                    white DejaVu Sans Bold captions (black outline) drawn by `drawtext`
                    in the bottom band, as burned-in subtitles are.
  test.truth.json   the ground truth: {"video", "width", "height", "duration", "cues":
                    [{"start", "end", "text"}, ...]} (seconds; a cue is on screen for
                    start <= t < end).

The cue times deliberately do not fall on the sampling grid, two cues touch with no gap
between them, and the others are separated by gaps. Needs ffmpeg with libfreetype and the
DejaVu font (fonts-dejavu-core); setup.sh installs both.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"

WIDTH, HEIGHT, RATE, DURATION = 640, 360, 25, 19.0
FONT_SIZE = 32
# (start, end, text): 1.8-2.6 s each; cues 2 and 3 touch, the rest have gaps.
CUES = [
    (0.8, 3.3, "The quick brown fox"),
    (4.2, 6.0, "jumps over the lazy dog"),
    (6.0, 8.6, "Every frame is a picture"),
    (10.1, 12.0, "Subtitles burned in"),
    (13.3, 15.9, "Good night and good luck"),
    (16.4, 18.2, "See you tomorrow"),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=os.path.join(HERE, "testdata"))
    ap.add_argument("--name", default="test")
    args = ap.parse_args()

    out_dir = os.path.abspath(args.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if not os.path.exists(FONT):
        sys.exit(f"make_test_video: font {FONT} missing (apt-get install fonts-dejavu-core)")
    video = os.path.join(out_dir, args.name + ".mp4")
    truth = os.path.join(out_dir, args.name + ".truth.json")

    with tempfile.TemporaryDirectory() as tmp:
        # Each caption's text goes through a file, so no text needs filtergraph escaping;
        # ffmpeg runs in tmp so the file names are plain relative names.
        filters = []
        for i, (start, end, text) in enumerate(CUES):
            with open(os.path.join(tmp, f"cue{i}.txt"), "w") as f:
                f.write(text)
            filters.append(
                f"drawtext=fontfile={FONT}:textfile=cue{i}.txt:fontsize={FONT_SIZE}"
                f":fontcolor=white:borderw=3:bordercolor=black"
                f":x=(w-text_w)/2:y=h-{FONT_SIZE}-30"
                f":enable='gte(t,{start})*lt(t,{end})'"
            )
        argv = [
            "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
            "-f", "lavfi", "-i", f"testsrc2=size={WIDTH}x{HEIGHT}:rate={RATE}:duration={DURATION}",
            "-vf", ",".join(filters),
            "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p",
            "-movflags", "+faststart", video,
        ]
        subprocess.run(argv, cwd=tmp, check=True)

    doc = {
        "video": video,
        "width": WIDTH,
        "height": HEIGHT,
        "duration": DURATION,
        "cues": [{"start": s, "end": e, "text": t} for s, e, t in CUES],
    }
    with open(truth, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    print(json.dumps({"video": video, "truth": truth, "cues": len(CUES)}))


if __name__ == "__main__":
    main()
