"""The generation planner: Falcon-180B and Llama-2-70B shapes (no weights) on cluster profiles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapter.cli.main import cli
from adapter.core.errors import AdapterError
from adapter.passes.decoder_plan import WEIGHT_BYTES, DecoderShape, plan_decoder
from adapter.passes.sharding_plan import parse_cluster

CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"
PREFILL_HEAVY = {"batch": 16, "prompt": 2048, "new_tokens": 128}


def shape(name: str) -> DecoderShape:
    return DecoderShape.from_config(json.loads((CONFIGS / f"{name}.json").read_text()))


def test_shapes_from_the_published_configs():
    falcon, llama = shape("falcon-180b"), shape("llama-2-70b")
    assert (falcon.layers, falcon.heads, falcon.kv_heads, falcon.head_dim, falcon.intermediate) == (80, 232, 8, 64,
                                                                                                    4 * 14848)  # fmt: skip
    assert not falcon.gated and llama.gated and not llama.tied
    assert abs(falcon.params() / 180e9 - 1) < 0.01  # "180B"
    assert abs(llama.params() / 68.98e9 - 1) < 0.001  # Llama 2 70B: 68.98 B parameters


@pytest.mark.parametrize("name", ["falcon-180b", "llama-2-70b"])
def test_eight_h100_run_tensor_parallel_bf16_and_memory_adds_up(name):
    s = shape(name)
    plan = plan_decoder(s, "8xnvidia-h100", batch=1, prompt=2048, new_tokens=256)
    best = plan.chosen
    assert (plan.tp, plan.pp, plan.weights) == (8, 1, "bf16") and best.fits
    assert best.kv_split and best.kv_heads_per_rank == 1  # 8 KV heads over 8 ranks
    # weights per rank: the layers / 8 plus the vocabulary-split tables
    tables = s.vocab * s.hidden * (1 if s.tied else 2) / 8
    expected = (s.layers * (s.layer_params() - 4 * s.hidden) / 8 + s.layers * 4 * s.hidden + tables) * 2
    assert best.memory["weights"] == pytest.approx(expected, rel=1e-6)
    kv = 2 * s.layers * 1 * (2048 + 256) * 1 * s.head_dim * 2
    assert best.memory["kv_cache"] == pytest.approx(kv, rel=1e-9)
    assert best.memory["total"] <= parse_cluster("8xnvidia-h100").memory_size
    # decode is the time to read a rank's weights and cache, plus the per-layer all-reduces
    profile = parse_cluster("8xnvidia-h100").profile
    floor = best.memory["weights"] / profile.memory_bandwidth * 1e3
    assert floor <= best.decode_ms <= floor * 1.05 + best.comm["decode_tp_ms"] + 0.1
    assert best.comm["decode_tp_ms"] == pytest.approx(2 * s.layers * (5e-6 + 2 * 7 / 8 * s.hidden * 2 / 450e9) * 1e3)


@pytest.mark.parametrize("name", ["falcon-180b", "llama-2-70b"])
def test_the_choice_turns_from_tensor_to_pipeline_parallel_on_a_slow_link(name):
    nvlink = plan_decoder(shape(name), "8xnvidia-a100", **PREFILL_HEAVY)
    pcie = plan_decoder(shape(name), "8xnvidia-a100-pcie", **PREFILL_HEAVY)  # same chip, PCIe only
    assert (nvlink.tp, nvlink.pp) == (8, 1)
    assert (pcie.tp, pcie.pp) == (4, 2)
    tp8 = next(c for c in pcie.candidates if (c.tp, c.pp) == (8, 1))
    assert tp8.fits and tp8.request_ms > pcie.chosen.request_ms  # TP8 fits but its all-reduces cost more
    assert tp8.comm["prefill_tp_ms"] > 5 * next(c for c in nvlink.candidates if c.tp == 8).comm["prefill_tp_ms"]


def test_four_gpus_fall_back_to_weight_only_int8_for_falcon_180b():
    plan = plan_decoder(shape("falcon-180b"), "4xnvidia-h100", batch=1, prompt=2048, new_tokens=256)
    assert plan.weights == "int8" and plan.chosen.fits and (plan.tp, plan.pp) == (4, 1)
    bf16 = [c for c in plan.candidates if c.weights == "bf16"]
    assert bf16 and not any(c.fits for c in bf16) and all("GiB per rank >" in c.reason for c in bf16 if c.tp == 4)
    assert plan.chosen.memory["weights"] < 80 * 2**30 < 4 * 2 * shape("falcon-180b").params() / 4
    with pytest.raises(AdapterError, match="No way to shard"):
        plan_decoder(shape("falcon-180b"), "2xnvidia-a100-pcie", weights="bf16")
    assert WEIGHT_BYTES["int4"] < WEIGHT_BYTES["int8"] < WEIGHT_BYTES["bf16"]


def test_heads_that_do_not_divide_are_not_candidates():
    plan = plan_decoder(shape("falcon-180b"), "8xnvidia-h100", tp=8)  # 232 heads = 8 x 29
    assert plan.tp == 8
    odd = DecoderShape("llama", 4, 512, 6, 2, 64, 1024, 1000, True, False)
    plan = plan_decoder(odd, "4xnvidia-h100")
    reasons = {(c.tp, c.pp): c.reason for c in plan.candidates}
    assert reasons[(4, 1)] == "6 heads do not split 4 ways" and plan.tp in (1, 2)
    two = next(c for c in plan.candidates if c.tp == 2)
    assert two.kv_split and two.kv_heads_per_rank == 1


def test_plan_cli_for_a_config_file():
    result = CliRunner().invoke(cli, ["plan", str(CONFIGS / "falcon-180b.json"), "--target", "8xnvidia-h100",
                                      "--batch", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "plan: tp=8 pp=1, bf16 weights" in result.output and "decode" in result.output
    assert "178.6 B parameters" in result.output and "KV cache" in result.output
    data = json.loads(CliRunner().invoke(cli, ["plan", str(CONFIGS / "llama-2-70b.json"), "--target",
                                               "8xnvidia-a100-pcie", "--batch", "16", "--new-tokens", "128",
                                               "--json"]).output)  # fmt: skip
    assert (data["tp"], data["pp"]) == (4, 2)
