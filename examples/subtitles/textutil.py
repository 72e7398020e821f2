"""Text helpers shared by write_srt.py and check_srt.py."""
import re
import unicodedata


def squash(text):
    """Case- and whitespace-insensitive form: NFKC, lower case, every whitespace removed.

    Whitespace is removed, not just collapsed, because the PP-OCR recognition model often
    drops the space between two words ("quickbrown"); that is not a misread letter.
    """
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", text).lower())


def levenshtein(a, b):
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def srt_time(seconds):
    ms = int(round(max(0.0, seconds) * 1000))
    h, ms = divmod(ms, 3600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def parse_srt_time(text):
    m = re.fullmatch(r"\s*(\d+):(\d{1,2}):(\d{1,2})[,.](\d{1,3})\s*", text)
    if not m:
        raise ValueError(f"bad SRT time {text!r}")
    h, mi, s, ms = m.groups()
    return int(h) * 3600 + int(mi) * 60 + int(s) + int(ms.ljust(3, "0")) / 1000.0


def parse_srt(content):
    """[{"index", "start", "end", "text"}] from SRT text (lines of one cue joined by a space)."""
    cues = []
    blocks = re.split(r"\n\s*\n", content.replace("\r\n", "\n").replace("\ufeff", "").strip())
    for block in blocks:
        lines = [l for l in block.split("\n") if l.strip()]
        if not lines:
            continue
        i = 0
        if "-->" not in lines[0]:
            i = 1
        if i >= len(lines) or "-->" not in lines[i]:
            raise ValueError(f"SRT block without a 'start --> end' line: {block!r}")
        start, end = lines[i].split("-->", 1)
        cues.append({
            "index": lines[0].strip() if i else str(len(cues) + 1),
            "start": parse_srt_time(start),
            "end": parse_srt_time(end.split()[0] if end.split() else end),
            "text": " ".join(l.strip() for l in lines[i + 1:]),
        })
    return cues
