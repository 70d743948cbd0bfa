"""A decoder twice the converting process's memory converts to TP=4 and generates.

The source is a random Llama-shaped folder (5 layers of width 4096, BF16 safetensors shards:
4.6 GB of FP32 weights once converted), written one shard at a time. ``adapter shard`` runs
in a child process whose address space is limited to 2 GiB (``RLIMIT_AS``: every mapping
counts, so the checkpoint cannot simply be mapped either), streams each rank's weights from
the checkpoint into that rank's files, and the four ranks then generate under torchrun with
their weight files mapped (no second copy). The tokens are compared with transformers' eager
model of the same folder, loaded here, where no limit applies.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from adapter.llm.families import load_causal_lm, tiny_config, write_random_shards
from adapter.llm.sharded import generate_sharded

LIMIT = 2 * 2**30
"""Address space of the converting process (bytes)."""
PROMPT = [5, 17, 300, 1234, 42, 7, 99, 1000]
NEW = 8

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    free = shutil.disk_usage(root).free
    assert free > 10e9, f"this test writes 7 GB under {root}; {free / 1e9:.1f} GB are free"
    config = tiny_config("llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=5,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                         max_position_embeddings=2048)  # fmt: skip
    folder = write_random_shards(config, root / "llama-1.2b", bf16=True, shard_bytes=512 * 2**20)
    yield folder
    shutil.rmtree(root, ignore_errors=True)


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


def test_twice_the_converting_memory_converts_to_tp4_and_generates(big_folder, tmp_path):
    out = tmp_path / "tp4"
    env = dict(os.environ, MALLOC_ARENA_MAX="2")
    done = subprocess.run(
        [sys.executable, "-m", "adapter.cli", "shard", str(big_folder), "--target", "4xhost", "--tp", "4", "--pp", "1",
         "-o", str(out), "--json"],
        capture_output=True, text=True, preexec_fn=_limit, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads(done.stdout)
    weights = manifest["weights_bytes"]
    assert weights["unsharded"] >= 2 * LIMIT  # FP32 weights at least twice the converting process's memory
    assert manifest["peak_rss_bytes"] < LIMIT and "no unsharded reference" in manifest["verification"]["skipped"]
    shards = [weights["per_rank"][str(r)] for r in range(4)]
    assert all(abs(s / weights["unsharded"] - 0.25) < 0.01 for s in shards)
    # the ranks generate with their weight files mapped: peak RSS within 1.3 x (weights + KV cache)
    ran = generate_sharded(out, 4, [PROMPT], NEW, stop_at_eos=False, timeout=300)
    layout = manifest["layout"]
    kv = 2 * layout["num_layers"] * (len(PROMPT) + NEW) * (layout["kv_heads"] // 4) * layout["head_dim"] * 4
    for report in ran["ranks"]:
        assert report["peak_rss_bytes"] <= 1.3 * (shards[report["rank"]] + kv), report
    tokens = ran["generation"]["tokens"][0]
    assert len(tokens) == NEW
    # the same folder in transformers' eager model (FP32), here: the same greedy tokens
    lm = load_causal_lm(big_folder)
    with torch.no_grad():
        eager = lm.model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, do_sample=False,
                                  attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long))  # fmt: skip
    assert tokens == eager[0, len(PROMPT) :].tolist()
    assert np.isfinite(ran["generation"]["decode_tokens_per_s"])
