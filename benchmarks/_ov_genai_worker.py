"""OpenVINO GenAI's LLMPipeline as a worker process for benchmarks/llm_peers.py.

It runs with the Python of a separate environment (optimum-intel pins a transformers
older than adapter's, so OpenVINO GenAI and its exporter live in their own venv; see
``llm_peers.py --ov-genai-python``). Protocol: one JSON request per stdin line, one JSON
reply per stdout line.

    {"prompts": [[ids...], ...], "new": 128}  ->  {"ttft_ms": ..., "decode_tokens_per_s": ...}

Greedy, every row runs to ``new`` tokens (``ignore_eos``, ``min_new_tokens``); time to first
token comes from the pipeline's own ``perf_metrics``; decode tokens/s counts the tokens
after the first of all rows over the wall time after the first token, as for every other
row of the benchmark.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> int:
    import numpy as np
    import openvino as ov
    import openvino_genai

    folder, threads = sys.argv[1], int(sys.argv[2])
    pipe = openvino_genai.LLMPipeline(folder, "CPU", INFERENCE_NUM_THREADS=threads)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        prompts = np.array(request["prompts"], dtype=np.int64)
        config = openvino_genai.GenerationConfig()
        config.max_new_tokens = config.min_new_tokens = int(request["new"])
        config.ignore_eos = True
        config.do_sample = False
        inputs = openvino_genai.TokenizedInputs(ov.Tensor(prompts), ov.Tensor(np.ones_like(prompts)))
        started = time.perf_counter()
        result = pipe.generate(inputs, config)
        total_ms = (time.perf_counter() - started) * 1e3
        ttft_ms = result.perf_metrics.get_ttft().mean
        decoded = len(prompts) * (config.max_new_tokens - 1)
        reply = {"ttft_ms": ttft_ms, "decode_tokens_per_s": decoded * 1e3 / (total_ms - ttft_ms)}
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
