"""Code a user writes against the clients; test_typing.py checks it with `mypy --strict`
(attributes typed, no dict lookups needed). Not run."""

import asyncio
from typing import List, Optional

import gpuflow


def follow(client: gpuflow.Client, video: str) -> Optional[str]:
    job = client.submit("subtitles", {"video": video}, idempotency_key=video)
    done: gpuflow.Job = client.wait(job.id, timeout=600)
    for stage in done.stages:
        last: Optional[gpuflow.Attempt] = stage.attempt_history[-1] if stage.attempt_history else None
        if last is not None and last.exit_code:
            print(stage.name, last.exit_code, client.logs(done.id, stage.name).text)
    findings: List[gpuflow.Finding] = client.doctor().open
    print([f.fix for f in findings])
    try:
        client.cancel(done.id)
    except gpuflow.ConflictError as exc:
        print(exc.code, exc.status, exc.message)
    return done.error


async def follow_all(videos: List[str]) -> List[str]:
    async with gpuflow.AsyncClient() as client:
        entries = await client.submit_batch({"pipeline": "subtitles", "input": {"video": v}} for v in videos)
        ids = [e.id for e in entries if e.id is not None]
        jobs = await asyncio.gather(*(client.wait(i) for i in ids))
        return [j.state for j in jobs]
