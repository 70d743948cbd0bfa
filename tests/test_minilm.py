"""The main job: the bundled all-MiniLM-L6-v2 (real weights) to the host CPU and to the
Sapphire Rapids profile, verified against eager PyTorch; `adapter run` agrees."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adapter.profiles.probe import probe_host
from adapter.zoo import minilm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def eager():
    module, inputs, _ = minilm()
    return module, {k: v.numpy() for k, v in inputs.items()}


def _eager_outputs(module, feed):
    with torch.no_grad():
        result = module(**{k: torch.from_numpy(v) for k, v in feed.items()})
    return {k: v.numpy() for k, v in result.items()}


def _cosine(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize(("target", "flags"), [("host", ()), ("intel-xeon-spr", ("--precision", "fp32"))])
def test_convert_run_matches_eager(cli, tmp_path, eager, target, flags):
    """The README's command (the default precision: BF16 where this CPU computes it, within
    the near-lossless budget, else FP32) and an exact FP32 engine for a named target: each
    gives eager's numbers on inputs it never saw, exactly or within the default's budget."""
    module, examples = eager
    out = tmp_path / f"minilm-{target}"
    code, stdout, stderr = cli("convert", "adapter.zoo:minilm", "--target", target, "-o", out, "--json", *flags)
    assert code == 0, stderr
    manifest = json.loads(stdout)["manifest"]
    assert manifest["target"]["name"] == target
    precision = manifest["precision"]
    exact = precision["mode"] == "fp32"
    if not flags:  # BF16 only where the host computes it natively (2-7x FP32's rate there)
        assert precision["requested"] == "default" and precision["reason"], precision
        if "bf16" not in probe_host().precisions:
            assert precision["mode"] == "fp32" and "no bf16" in precision["reason"], precision
        elif precision["mode"] == "fp32":  # the race's winner ran FP32: it says why it did not take BF16
            assert any(w in precision["reason"] for w in ("does not run bf16", "not faster", "misses")), precision
    if exact:
        for figures in manifest["verification"]["worst"].values():
            assert figures["cosine"] >= 0.99999 and figures["max_abs"] <= 1e-4
    else:
        budget = manifest["verification"]["budget"]
        assert budget["passed"] and budget["budget"].startswith("cos>=0.9999,max_rel<=0.02"), budget

    # adapter run on fresh inputs (a batch and length never exported) gives eager's numbers
    rng = np.random.default_rng(4)
    ids = rng.integers(1000, 29000, (3, 40), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = np.ones_like(ids)
    mask[2, 30:] = 0
    np.savez(tmp_path / "in.npz", input_ids=ids, attention_mask=mask)
    code, _, stderr = cli("run", out, "--inputs", tmp_path / "in.npz", "--output", tmp_path / "out.npz")
    assert code == 0, stderr
    with np.load(tmp_path / "out.npz") as saved:
        got = {k: saved[k] for k in saved.files}
    want = _eager_outputs(module, {"input_ids": ids, "attention_mask": mask})
    for name in ("token_embeddings", "sentence_embedding"):
        bound = 1e-4 if exact else 0.02 * np.abs(want[name]).max()
        assert np.abs(got[name] - want[name]).max() <= bound, name
        assert _cosine(got[name], want[name]) >= (0.99999 if exact else 0.9999), name


def test_second_convert_is_a_cache_hit(cli, tmp_path):
    """The README's command again is served from the engine cache. The host case above
    converted MiniLM in this session, so the first call here is a hit too (run alone, it
    converts); that each part of the key, changed alone, misses is test_atomic.py's."""
    command = ("convert", "adapter.zoo:minilm", "--target", "host", "--no-bench")
    code, first, err = cli(*command, "-o", tmp_path / "a")
    assert code == 0 and ("converted and verified" in first or "cache hit" in first), err
    code, second, err = cli(*command, "-o", tmp_path / "b")
    assert code == 0 and "cache hit" in second, err
    code, info, err = cli("info", tmp_path / "b")
    assert code == 0 and "token_embeddings" in info and "Verification" in info
