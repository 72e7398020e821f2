"""`GET /metrics` of a freshly started engine, read by the OpenMetrics parser of the official
Prometheus client (`prometheus_client.openmetrics.parser`):

- the text is valid OpenMetrics and answered as `application/openmetrics-text`;
- every family the metrics table of docs/pipelines.md documents is there from the start, with
  the documented type;
- names follow Prometheus' rules: `_total` on counters only, `_seconds` for times, `_bytes`
  for sizes, `_ratio` for 0..1 values, base units only;
- `gpuflow_queue_depth` and `gpuflow_running_tasks` read 0 for every stage of the pipeline
  file when idle, from the start and again after a job.

    python3 e2e/api/check_metrics.py BASE_URL PIPELINE STAGE[,STAGE...] docs/pipelines.md
"""

import json
import re
import sys
import time
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families


def scrape(base):
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        content_type = r.headers["content-type"]
        assert content_type.startswith("application/openmetrics-text"), content_type
        text = r.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families, "no metric family at all"
    return families


def documented(docs_path):
    """`(name as documented, type)` rows of the metrics table."""
    text = open(docs_path, encoding="utf-8").read()
    table = text.split("| family | type | labels | what |", 1)[1].splitlines()[2:]
    rows = []
    for line in table:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.split("|")]
        rows.append((cells[1].strip("`"), cells[2]))
    assert len(rows) >= 20, f"the metrics table lists {len(rows)} families"
    return rows


def family_of(families, name, kind):
    family = name[: -len("_total")] if kind == "counter" else name
    if kind == "counter":
        assert name.endswith("_total"), f"{name}: a counter is documented with its _total samples"
    assert family in families, f"documented family {name} is not in /metrics; it has {sorted(families)}"
    f = families[family]
    assert f.type == kind, f"{name} is documented as a {kind} but is a {f.type}"
    return f


def check_naming(f):
    name, help_text = f.name, f.documentation.lower()
    assert re.fullmatch(r"[a-z][a-z0-9_]*", name), f"{name}: lower-case snake case"
    for unit in ("_ms", "_milliseconds", "_pct", "_percent", "_kib", "_mib", "_gib"):
        assert unit not in name, f"{name}: base units only (seconds, bytes, ratios), not {unit}"
    if f.type == "counter":
        assert all(s.name.endswith(("_total", "_created")) for s in f.samples), f"{name}: counter samples end in _total"
    else:
        assert not name.endswith("_total"), f"{name}: only counters end in _total"
    if "0..1" in help_text or "fraction" in help_text:
        assert name.endswith("_ratio"), f"{name}: a 0..1 value ends in _ratio ({help_text})"
    if re.search(r"\btime\b|how long|duration", help_text):
        assert name.endswith("_seconds"), f"{name}: a time ends in _seconds ({help_text})"
    if "memory" in help_text:
        assert name.endswith("_bytes"), f"{name}: a size ends in _bytes ({help_text})"


def value(f, **labels):
    for s in f.samples:
        if all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def idle_gauges_read_zero(families, pipeline, stages, when):
    for stage in stages:
        for gauge in ("gpuflow_queue_depth", "gpuflow_running_tasks"):
            v = value(families[gauge], pipeline=pipeline, stage=stage)
            assert v == 0, f"{gauge}{{pipeline={pipeline},stage={stage}}} is {v} {when}, not 0"


def main():
    base, pipeline, stages, docs = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4]
    families = scrape(base)
    for f in families.values():
        check_naming(f)
    for name, kind in documented(docs):
        family_of(families, name, kind)
    idle_gauges_read_zero(families, pipeline, stages, "at start")
    assert value(families["gpuflow_jobs_submitted"], pipeline=pipeline) == 0
    for state in ("succeeded", "failed", "cancelled"):
        assert value(families["gpuflow_jobs_finished"], pipeline=pipeline, state=state) == 0, state

    request = urllib.request.Request(
        f"{base}/v1/jobs",
        data=json.dumps({"pipeline": pipeline, "input": {"text": "metrics"}}).encode(),
        headers={"content-type": "application/json"},
    )
    job = json.load(urllib.request.urlopen(request, timeout=10))
    deadline = time.time() + 60
    while True:
        state = json.load(urllib.request.urlopen(f"{base}/v1/jobs/{job['id']}", timeout=10))["state"]
        if state in ("succeeded", "failed", "cancelled"):
            break
        assert time.time() < deadline, f"job {job['id']} still {state}"
        time.sleep(0.1)
    families = scrape(base)
    assert value(families["gpuflow_jobs_submitted"], pipeline=pipeline) == 1
    assert value(families["gpuflow_jobs_finished"], pipeline=pipeline, state=state) == 1
    idle_gauges_read_zero(families, pipeline, stages, "after a job")
    print(f"metrics: {len(families)} families, valid OpenMetrics, named by the rules, all documented ones present")


if __name__ == "__main__":
    main()
