"""Sharding passes: tensor-parallel ranks and pipeline stages reproduce the unsharded engine.

Here the pass itself is checked: every rank's segments are run in lock-step in one process
(collectives done with numpy), so a wrong split fails without any launcher. The same
artifacts under ``torchrun`` are tested in ``test_sharded_launch.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from adapter.backends import get_backend
from adapter.passes.sharding import build_sharded, tensor_parallel_module

from adapter.errors import AdapterError
from adapter.specs import TensorSpec


def _engine(folder: Path, entry: dict):
    module = get_backend(entry["backend"])
    inputs = [TensorSpec.from_json(s) for s in entry["inputs"]]
    outputs = [TensorSpec.from_json(s) for s in entry["outputs"]]
    return module.Engine(folder / entry["folder"], inputs, outputs, entry["config"])


def lockstep(folder: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run every rank's steps stage by stage; all-reduce = sum, all-gather = concatenate."""
    manifest = json.loads((folder / "manifest.json").read_text())
    ranks = {r["rank"]: r for r in manifest["ranks"]}
    tp, pp = manifest["tp"], manifest["pp"]
    env: dict[int, dict[str, np.ndarray]] = {r: {} for r in ranks}
    for stage in range(pp):
        group = [stage * tp + t for t in range(tp)]
        for r in group:
            env[r].update(feed if stage == 0 else {k: env[r - tp][k] for k in ranks[r]["recv"]})
        for i, step in enumerate(ranks[group[0]]["steps"]):
            if step["op"] == "run":
                for r in group:
                    entry = ranks[r]["steps"][i]["engine"]
                    env[r].update(_engine(folder, entry).run({s["name"]: env[r][s["name"]] for s in entry["inputs"]}))
                continue
            parts = [env[r][ranks[r]["steps"][i]["input"]] for r in group]
            total = sum(parts) if step["op"] == "all_reduce" else np.concatenate(parts, axis=step["axis"])
            for r in group:
                env[r][ranks[r]["steps"][i]["output"]] = total
    last = ranks[(pp - 1) * tp]
    return {name: env[last["rank"]][name] for name in last["outputs"]}


def unsharded(folder: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = {**manifest["unsharded"], "inputs": manifest["inputs"], "outputs": manifest["outputs"]}
    return _engine(folder, entry).run(feed)


@pytest.fixture(scope="module")
def gpt2_2x2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded") / "gpt2"
    return folder, build_sharded("adapter.zoo:gpt2", folder, tp=2, pp=2, microbatches=2)


@pytest.fixture(scope="module")
def minilm_tp2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded") / "minilm"
    return folder, build_sharded("adapter.zoo:minilm", folder, tp=2, pp=1)


def test_gpt2_tp2_pp2_ranks_reproduce_the_unsharded_engine(gpt2_2x2):
    folder, manifest = gpt2_2x2
    assert manifest["world_size"] == 4 and [r["stage"] for r in manifest["ranks"]] == [0, 0, 1, 1]
    # each stage's boundary values are explicit, and stage 1 receives what stage 0 sends
    assert manifest["ranks"][2]["recv"] == manifest["ranks"][0]["send"] and manifest["ranks"][2]["recv"]
    ops = [s["op"] for r in manifest["ranks"][:2] for s in r["steps"]] + [
        s["op"] for r in manifest["ranks"][2:] for s in r["steps"]
    ]
    # 2 layers x 2 row-parallel pairs + the vocab-parallel embedding, per tp rank; one all-gather of the logits
    assert ops.count("all_reduce") == 2 * (2 * 2 + 1) and ops.count("all_gather") == 2
    feed = dict(np.load(folder / "example_inputs.npz"))
    rng = np.random.default_rng(0)
    for case in (feed, {"input_ids": rng.integers(0, 256, (3, 17)), "attention_mask": np.ones((3, 17), np.int64)}):
        got, want = lockstep(folder, case), unsharded(folder, case)
        assert np.abs(got["logits"] - want["logits"]).max() <= 1e-5


def test_gpt2_tp2_halves_the_weights_per_rank(gpt2_2x2):
    weights = gpt2_2x2[1]["weights_bytes"]
    for rank in ("0", "1"):  # stage 0; stage 1 holds the rest
        assert 0 < weights["per_rank"][rank] < weights["unsharded"]
    pairs = [weights["per_rank"][str(r)] + weights["per_rank"][str(r + 2)] for r in (0, 1)]  # one tp rank, both stages
    assert all(p <= 0.55 * weights["unsharded"] for p in pairs), (pairs, weights["unsharded"])


@pytest.mark.slow
def test_minilm_tp2_weights_and_numerics(minilm_tp2):
    folder, manifest = minilm_tp2
    weights = manifest["weights_bytes"]
    ratios = [weights["per_rank"][r] / weights["unsharded"] for r in ("0", "1")]
    assert all(r <= 0.55 for r in ratios), ratios  # the vocabulary-split embedding is half the model
    feed = dict(np.load(folder / "example_inputs.npz"))
    got, want = lockstep(folder, feed), unsharded(folder, feed)
    for name in want:
        assert np.abs(got[name] - want[name]).max() <= 1e-5, name


def test_unknown_architectures_and_bad_splits_are_refused():
    from models import mlp

    module, _, _ = mlp()
    with pytest.raises(AdapterError, match="tensor-parallel rules"):
        tensor_parallel_module(module, 2, 0)
    from adapter.zoo import gpt2

    model, _, _ = gpt2()
    with pytest.raises(AdapterError, match="cannot be split 3 ways"):
        tensor_parallel_module(model, 3, 0)  # 4 heads
