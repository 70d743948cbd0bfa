"""The peer server of benchmarks/serve_load.py: OpenVINO GenAI's ContinuousBatchingPipeline
behind a minimal Starlette wrapper, run with the Python of OpenVINO GenAI's own environment
(see ``_ov_genai_worker.py``: optimum-intel pins an older transformers than adapter's).

It answers what the load test sends to ``adapter serve``: ``GET /health`` and streamed
``POST /v1/completions`` with a token-id prompt (``max_tokens``, greedy), each event carrying
``choices[0].token_ids``. One engine thread adds the waiting requests to the pipeline, calls
``pipe.step()`` while any is unfinished (OpenVINO GenAI's scheduler: paged KV cache, up to
``--max-seqs`` sequences, prompts split to fill ``max_num_batched_tokens`` beside the
decoding rows) and hands each request the tokens its handle has ready.

    build/ovgenai-venv/bin/python benchmarks/_ov_genai_server.py FOLDER --port 8001 --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import signal
import sys
import threading


def main() -> int:
    import numpy as np
    import openvino as ov
    import openvino_genai as genai
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-seqs", type=int, default=8)
    parser.add_argument("--cache-gb", type=int, default=1)
    args = parser.parse_args()

    scheduler = genai.SchedulerConfig()
    scheduler.max_num_seqs = args.max_seqs
    scheduler.cache_size = args.cache_gb
    pipe = genai.ContinuousBatchingPipeline(args.folder, scheduler, "CPU", {"INFERENCE_NUM_THREADS": args.threads})
    inbox: queue.Queue = queue.Queue()

    def engine() -> None:
        live: dict[int, tuple] = {}
        next_id = 0
        while True:
            try:
                while True:
                    ids, max_tokens, channel, loop = inbox.get(timeout=0.02 if not live else 0)
                    config = genai.GenerationConfig()
                    config.max_new_tokens = max_tokens
                    config.do_sample = False
                    handle = pipe.add_request(next_id, ov.Tensor(np.array([ids], np.int64)), config)
                    live[next_id] = (handle, channel, loop)
                    next_id += 1
            except queue.Empty:
                pass
            if not live:
                continue
            pipe.step()
            for key, (handle, channel, loop) in list(live.items()):
                if handle.can_read():
                    tokens = [t for output in handle.read().values() for t in output.generated_ids]
                    if tokens:
                        loop.call_soon_threadsafe(channel.put_nowait, tokens)
                if handle.get_status() != genai.GenerationStatus.RUNNING and not handle.can_read():
                    loop.call_soon_threadsafe(channel.put_nowait, None)
                    del live[key]

    threading.Thread(target=engine, daemon=True).start()

    async def completions(request: Request):
        body = await request.json()
        channel: asyncio.Queue = asyncio.Queue()
        inbox.put((list(body["prompt"]), int(body.get("max_tokens", 16)), channel, asyncio.get_running_loop()))

        async def events():
            while (tokens := await channel.get()) is not None:
                yield f"data: {json.dumps({'choices': [{'index': 0, 'token_ids': tokens}]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def health(_request: Request):
        return JSONResponse({"status": "ok"})

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]), Route("/health", health)])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
