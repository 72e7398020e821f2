#!/usr/bin/env python3
"""gpuflow stage `extract_keyframes` (CPU): sample frames of a video, cropped to the subtitle band.

    extract_keyframes.py VIDEO [--fps 2] [--band 0.25]

One ffmpeg run (argv list, no shell) decodes the video once and keeps the first frame of
each 1/fps interval (`select`), crops it to the bottom `band` fraction of the picture where
burned-in subtitles sit (`crop`: less for OCR to look at, and the rest of the picture cannot
add spurious text), and writes it as PNG into $GPUFLOW_JOB_DIR/frames/. `showinfo` reports
the real presentation time of each kept frame, which becomes its timestamp.

Writes to $GPUFLOW_OUTPUT:
    {"frames_dir", "fps", "interval", "band", "crop": {"x","y","w","h"}, "duration",
     "video", "count", "frames": [{"file": ABS_PATH, "t": SECONDS}, ...]}

Exit status: 0 on success, 2 for bad arguments or an unreadable video, 1 when ffmpeg fails.
Re-running (a retry) starts from an empty frames directory.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys


def die(code, msg):
    print(f"extract_keyframes: {msg}", file=sys.stderr)
    sys.exit(code)


def probe(video):
    """(width, height, duration) of the first video stream."""
    argv = ["ffprobe", "-v", "error", "-select_streams", "v:0",
            "-show_entries", "stream=width,height:format=duration", "-of", "json", video]
    p = subprocess.run(argv, capture_output=True, text=True)
    if p.returncode != 0:
        die(2, f"ffprobe cannot read {video}: {p.stderr.strip()[-500:]}")
    info = json.loads(p.stdout or "{}")
    streams = info.get("streams") or []
    if not streams:
        die(2, f"{video} has no video stream")
    dur = info.get("format", {}).get("duration")
    return int(streams[0]["width"]), int(streams[0]["height"]), float(dur) if dur else None


def main():
    ap = argparse.ArgumentParser(description="sample frames cropped to the subtitle band")
    ap.add_argument("video")
    ap.add_argument("--fps", type=float, default=2.0, help="frames sampled per second (default 2)")
    ap.add_argument("--band", type=float, default=0.25,
                    help="height of the bottom band kept, as a fraction of the picture (default 0.25; 1 = no crop)")
    ap.add_argument("--out-dir", default=None,
                    help="where frames go (default: $GPUFLOW_JOB_DIR/frames)")
    args = ap.parse_args()

    if not (0 < args.fps <= 60):
        die(2, f"--fps must be in (0, 60], got {args.fps}")
    if not (0 < args.band <= 1):
        die(2, f"--band must be in (0, 1], got {args.band}")
    if not os.path.isfile(args.video):
        die(2, f"no such video file: {args.video}")

    job_dir = os.environ.get("GPUFLOW_JOB_DIR") or "."
    out_dir = os.path.abspath(args.out_dir or os.path.join(job_dir, "frames"))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)

    width, height, duration = probe(args.video)
    crop_h = max(2, int(round(height * args.band)))
    crop_y = height - crop_h
    fps = args.fps
    # First frame of each [k/fps, (k+1)/fps) bucket: no drift, and the frame keeps its own time.
    # The quotes protect the commas inside the expression from the filtergraph parser.
    select = (f"select='if(isnan(prev_selected_t),1,"
              f"gt(floor(t*{fps}),floor(prev_selected_t*{fps})))'")
    vf = f"{select},crop={width}:{crop_h}:0:{crop_y},showinfo"
    argv = ["ffmpeg", "-nostdin", "-hide_banner", "-y", "-i", args.video, "-an", "-sn",
            "-vf", vf, "-fps_mode", "passthrough", "-start_number", "0",
            os.path.join(out_dir, "%06d.png")]
    p = subprocess.run(argv, capture_output=True, text=True)
    if p.returncode != 0:
        die(1, f"ffmpeg failed ({p.returncode}): {p.stderr.strip()[-2000:]}")

    times = [float(m.group(1)) for m in re.finditer(r"\bn:\s*\d+\s+pts:\s*-?\d+\s+pts_time:(-?[\d.]+)", p.stderr)]
    files = sorted(f for f in os.listdir(out_dir) if f.endswith(".png"))
    if len(times) != len(files):
        die(1, f"ffmpeg wrote {len(files)} frames but showinfo reported {len(times)} timestamps")
    if not files:
        die(2, f"no frames decoded from {args.video}")

    out = {
        "video": os.path.abspath(args.video),
        "frames_dir": out_dir,
        "fps": fps,
        "interval": 1.0 / fps,
        "band": args.band,
        "crop": {"x": 0, "y": crop_y, "w": width, "h": crop_h},
        "duration": duration,
        "count": len(files),
        "frames": [{"file": os.path.join(out_dir, f), "t": round(t, 3)} for f, t in zip(files, times)],
    }
    text = json.dumps(out)
    dest = os.environ.get("GPUFLOW_OUTPUT")
    if dest:
        with open(dest, "w") as f:
            f.write(text)
    else:
        print(text)
    print(f"extract_keyframes: {len(files)} frames at {fps} fps, crop {width}x{crop_h}+0+{crop_y}, "
          f"duration {duration}", file=sys.stderr)


if __name__ == "__main__":
    main()
