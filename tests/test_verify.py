"""Verification's comparison: padded positions are left out only when the tolerance says so."""

from __future__ import annotations

import numpy as np
import pytest

from adapter.core.errors import VerificationError
from adapter.core.specs import Dim, TensorSpec
from adapter.core.verify import Tolerance, verify

SPECS = [
    TensorSpec("input_ids", "int64", (Dim("batch", 1, 4), Dim("seq", 1, 16))),
    TensorSpec("attention_mask", "int64", (Dim("batch", 1, 4), Dim("seq", 1, 16))),
]
EXAMPLE = {"input_ids": np.array([[5, 6, 7, 0, 0]]), "attention_mask": np.array([[1, 1, 1, 0, 0]])}


def _reference(feed):
    ids = feed["input_ids"].astype(np.float32)
    tokens = np.stack([ids + 1.0, ids * 0.5 - 2.0, np.sin(ids)], axis=-1)  # [batch, seq, 3]
    return {"tokens": tokens, "pooled": tokens.sum(axis=1)}  # [batch, 3]: never masked


def _engine(off_by: float, where: str):
    """The reference, with ``off_by`` added to the token outputs at masked or kept positions."""

    def run(feed):
        out = _reference(feed)
        mask = feed["attention_mask"] != 0
        chosen = ~mask if where == "padding" else mask
        out["tokens"] = out["tokens"] + off_by * chosen[..., None]
        return out

    return run


def test_padding_is_compared_unless_the_tolerance_skips_it():
    with pytest.raises(VerificationError, match="tokens in case"):
        verify(_engine(50.0, "padding"), _reference, SPECS, EXAMPLE, Tolerance())
    report = verify(_engine(50.0, "padding"), _reference, SPECS, EXAMPLE, Tolerance(skip_padding=True))
    assert report["passed"] and report["worst"]["tokens"]["max_abs"] == 0.0, report["worst"]
    # a difference at a kept position fails either way, and outputs not shaped like the mask stay whole
    with pytest.raises(VerificationError, match="tokens in case 'example'"):
        verify(_engine(50.0, "kept"), _reference, SPECS, EXAMPLE, Tolerance(skip_padding=True))
    report = verify(_engine(1e-3, "kept"), _reference, SPECS, EXAMPLE, Tolerance(atol=1e-2, skip_padding=True))
    assert report["worst"]["tokens"]["max_abs"] == pytest.approx(1e-3, rel=1e-3)
    assert report["cases"][0]["outputs"]["tokens"]["shape"] == [3, 3]  # the kept positions of [1, 5, 3]
