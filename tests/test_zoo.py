"""The bundled model zoo converts with dynamic axes and matches eager PyTorch.

MiniLM has real weights; the others are random-weight models built from transformers
configs (decoder LMs, a ViT, a ResNet, a T5 encoder, a Whisper encoder).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapter import ConvertOptions, convert, load
from adapter.zoo import ZOO

FP32 = {"max_abs": 1e-4, "cosine": 0.99999}


def _eager(factory, feed):
    module, _, _ = factory()
    with torch.no_grad():
        result = module(**{k: torch.from_numpy(v) for k, v in feed.items()})
    return {k: v.numpy() for k, v in result.items()}


def _fresh_inputs(manifest, sizes, rng):
    feed = {}
    for spec in manifest["inputs"]:
        shape = [sizes[d["name"]] if isinstance(d, dict) else d for d in spec["shape"]]
        if spec["dtype"] == "int64":
            feed[spec["name"]] = (
                np.ones(shape, np.int64) if "mask" in spec["name"] else rng.integers(0, 200, shape, dtype=np.int64)
            )
        else:
            feed[spec["name"]] = rng.standard_normal(shape).astype(spec["dtype"])
    return feed


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(ZOO) - {"minilm"}))
def test_zoo_model_converts_with_dynamic_axes(name, tmp_path):
    result = convert(f"adapter.zoo:{name}", tmp_path / name, ConvertOptions(benchmark=False))
    manifest = result.manifest
    assert manifest["verification"]["passed"]
    for figures in manifest["verification"]["worst"].values():
        assert figures["max_abs"] <= FP32["max_abs"] and figures["cosine"] >= FP32["cosine"]
    dims = {d["name"] for s in manifest["inputs"] for d in s["shape"] if isinstance(d, dict)}
    assert "batch" in dims
    # an independent check at a batch size (and sequence length) the export never saw
    sizes = {"batch": 5, "seq": 11}
    feed = _fresh_inputs(manifest, sizes, np.random.default_rng(1))
    got = load(tmp_path / name).run(feed)
    want = _eager(ZOO[name], feed)
    assert set(got) == set(want)
    for key in want:
        assert got[key].shape == want[key].shape
        assert np.abs(got[key] - want[key]).max() <= FP32["max_abs"], key
