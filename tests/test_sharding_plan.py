"""Tests for the sharding planner (``adapter.passes.sharding_plan``) and ``adapter plan``.

Two real exported graphs, each exported once per module: the bundled MiniLM, and a GPT-2
with GPT-2-medium-wide blocks (n_embd 1024, 16 heads) but 4 layers and an 8192-token
vocabulary, random weights, so that its export stays under half a minute.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnx_ir as ir
import pytest

from adapter import profiles
from adapter.converter.coverage import zoo_graphs
from adapter.core.errors import AdapterError
from adapter.op_library import node_cost
from adapter.passes.sharding_plan import LINK_LATENCY, analyze, parse_cluster, plan_sharding
from adapter.profiles import load_profile

A100 = Path(profiles.__file__).parent


def _canonical(source):
    from adapter.converter.importer import import_source
    from adapter.passes.pipeline import build_pipeline, run_pipeline

    model = import_source(source).model
    run_pipeline(model, build_pipeline("canonicalize"))
    return model


@pytest.fixture(scope="module")
def minilm():
    """MiniLM's canonical graph (a copy of the one the op library's coverage exports once per session)."""
    return ir.serde.deserialize_model(ir.serde.serialize_model(zoo_graphs(("minilm",))["minilm"]["canonicalize"]))


@pytest.fixture(scope="module")
def gpt2_wide(tmp_path_factory):
    """GPT-2 blocks 1024 wide with 16 heads, 4 layers, vocabulary 8192 (random weights); also saved as .onnx."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from adapter.converter.importer import PreparedSource
    from adapter.core.specs import Dim
    from adapter.zoo import _finish, _TextModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=8192, n_positions=256, n_embd=1024, n_layer=4, n_head=16, use_cache=False)
    module = _finish(_TextModel(AutoModelForCausalLM.from_config(config, attn_implementation="eager"), ("logits",)))
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    batch, seq = Dim("batch", 1, 64), Dim("seq", 1, 256)
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model = _canonical(PreparedSource("test:gpt2-wide", "factory", "0" * 64, module, inputs, dynamic))
    path = tmp_path_factory.mktemp("gpt2-wide") / "gpt2-wide.onnx"
    ir.save(model, path)
    return model, path


# --------------------------------------------------------------------------- graph facts and cluster text


def test_facts_from_real_graphs(minilm, gpt2_wide):
    facts = analyze(minilm)
    assert (len(facts.layers), facts.heads, facts.heads_source, facts.hidden) == (6, 12, "graph", 384)
    assert facts.layers[0] == "model.encoder.layer.0" and facts.vocab == 30522 and not facts.lm_head
    assert sum(facts.reduce_after) == 6 * 2 + 1  # two row-parallel MatMuls per block + the vocabulary embedding
    assert 80 * 2**20 < facts.weight_bytes < 100 * 2**20  # all-MiniLM-L6-v2: 22.7 M parameters in FP32
    wide = analyze(gpt2_wide[0])
    assert (len(wide.layers), wide.heads, wide.hidden, wide.vocab, wide.lm_head) == (4, 16, 1024, 8192, True)
    assert analyze(minilm, heads=6).heads_source == "argument"


@pytest.mark.parametrize("text", ["", "2x", "x2", "0xnvidia-a100", "2 by nvidia-a100", "2xno-such-gpu"])
def test_bad_cluster_text_is_a_clear_error(text):
    with pytest.raises(AdapterError, match=r"'<N>x<profile>'|unknown profile") as info:
        parse_cluster(text)
    assert info.value.hint


def test_cluster_parsing():
    cluster = parse_cluster("4xnvidia-a100-pcie")
    assert (cluster.count, cluster.profile.name, cluster.shared) == (4, "nvidia-a100-pcie", False)
    assert cluster.alpha == LINK_LATENCY["pcie"] and parse_cluster("2xnvidia-a100").alpha == LINK_LATENCY["nvlink"]
    host = parse_cluster("2xhost")
    assert host.shared and host.alpha == LINK_LATENCY["cpu"]
    assert host.peak("fp32") == pytest.approx(host.profile.peak("fp32") / 2)


# --------------------------------------------------------------------------- (a) the interconnect decides


def _choice(model, target, **kw):
    plan = plan_sharding(model, target, **kw)
    return plan.tp, plan.pp


def _tp_over_pp(model, target, **kw) -> float:
    """Estimated latency of pure tensor parallelism over that of a pure pipeline."""
    times = {(c.tp, c.pp): c.total_ms for c in plan_sharding(model, target, **kw).candidates}
    devices = int(target.partition("x")[0])
    return times[(devices, 1)] / times[(1, devices)]


def test_slow_link_gets_less_tensor_parallelism_minilm(minilm):
    # 2 devices: over PCIe tensor parallelism costs 1.5x the pipeline; over NVLink they are
    # within a few percent (MiniLM is small: 4 all-reduces of 0.4 MB per layer at batch 8)
    nvlink = _tp_over_pp(minilm, "2xnvidia-a100", batch=8, seq=128)
    pcie = _tp_over_pp(minilm, "2xnvidia-a100-pcie", batch=8, seq=128)
    assert nvlink < 1.05 and pcie > 1.3, (nvlink, pcie)
    assert _choice(minilm, "2xnvidia-a100-pcie", batch=8, seq=128) == (1, 2)
    # 4 and 8 devices over NVLink use tensor parallelism; over PCIe, 4 devices are a pure pipeline
    assert _choice(minilm, "8xnvidia-a100", batch=8, seq=128)[0] > 1
    assert _choice(minilm, "4xnvidia-a100-pcie", batch=8, seq=128) == (1, 4)
    assert _choice(minilm, "4xnvidia-a100", batch=8, seq=128)[0] > 1


@pytest.mark.parametrize("devices", [2, 4])
def test_slow_link_gets_less_tensor_parallelism_gpt2(gpt2_wide, devices):
    model = gpt2_wide[0]
    nvlink = _choice(model, f"{devices}xnvidia-a100", batch=8, seq=128)
    pcie = _choice(model, f"{devices}xnvidia-a100-pcie", batch=8, seq=128)
    assert nvlink == (devices, 1)
    assert pcie == (1, devices)


def test_candidate_table_lists_every_split(minilm):
    plan = plan_sharding(minilm, "8xnvidia-a100", batch=8, seq=128)
    table = {(c.tp, c.pp): c for c in plan.candidates}
    assert set(table) == {(1, 8), (2, 4), (4, 2), (8, 1)}
    assert table[(8, 1)].reason == "tp=8 does not divide the 12 attention heads"
    assert table[(1, 8)].reason == "pp=8 exceeds the 6 transformer blocks"
    chosen = plan.chosen
    assert chosen.fits and chosen.total_ms == min(c.total_ms for c in plan.candidates if c.fits)
    assert [s.layers for s in plan.stages][0][0] == 0 and plan.stages[-1].layers[1] == 6
    data = json.loads(json.dumps(plan.to_json()))
    assert data["tp"] == plan.tp and len(data["candidates"]) == 4


# --------------------------------------------------------------------------- (b) memory


def _small_gpu(tmp_path: Path, memory: int) -> Path:
    text = (A100 / "nvidia-a100.toml").read_text()
    text = re.sub(r"^memory_size = .*$", f"memory_size = {memory}", text, count=1, flags=re.MULTILINE)
    path = tmp_path / "small-gpu.toml"
    path.write_text(text.replace('name = "nvidia-a100"', 'name = "small-gpu"'))
    return path


def test_model_too_big_for_one_device_is_rejected_with_reason(gpt2_wide, tmp_path):
    model = gpt2_wide[0]
    one = plan_sharding(model, "1xnvidia-a100", batch=8, seq=128).memory_per_rank
    two = plan_sharding(model, "2xnvidia-a100", batch=8, seq=128, tp=2).memory_per_rank
    assert two < one
    path = _small_gpu(tmp_path, int((one + two) / 2))
    with pytest.raises(AdapterError, match=r"tp=1 pp=1: needs \d+\.\d+ GiB per rank, a small-gpu rank has") as info:
        plan_sharding(model, f"1x{path}", batch=8, seq=128)
    assert "--precision fp16" in info.value.hint
    plan = plan_sharding(model, f"2x{path}", batch=8, seq=128)
    assert plan.memory_per_rank <= (one + two) / 2
    assert any(c.fits for c in plan.candidates)


# --------------------------------------------------------------------------- (c) overrides


def test_overrides_are_honoured(gpt2_wide, minilm):
    plan = plan_sharding(gpt2_wide[0], "8xnvidia-a100", batch=8, seq=128, tp=2, pp=4, microbatches=4)
    assert (plan.tp, plan.pp, plan.microbatches, plan.microbatch_size) == (2, 4, 4, 2)
    assert [(c.tp, c.pp) for c in plan.candidates] == [(2, 4)]
    assert [s.layers for s in plan.stages] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert _choice(minilm, "4xnvidia-a100-pcie", batch=8, seq=128, tp=4) == (4, 1)  # slower, but asked for
    assert _choice(minilm, "4xnvidia-a100", batch=8, seq=128, pp=2) == (2, 2)


@pytest.mark.parametrize(
    ("target", "kw", "message"),
    [
        ("8xnvidia-a100", {"tp": 8}, r"tp=8 does not divide the 12 attention heads"),
        ("5xnvidia-a100", {"tp": 5}, r"tp=5 does not divide the 12 attention heads"),
        ("8xnvidia-a100", {"pp": 8}, r"pp=8 exceeds the 6 transformer blocks"),
        ("4xnvidia-a100", {"tp": 2, "pp": 4}, r"does not use the 4 devices"),
        ("4xnvidia-a100", {"tp": 3}, r"does not use the 4 devices"),
        ("2xnvidia-a100", {"microbatches": 16}, r"16 microbatches do not fit a batch of 8"),
        ("2xhost", {"precision": "fp8"}, r"no peak figure for 'fp8'"),  # the probe measures no FP8
    ],
)
def test_impossible_requests_are_clear_errors(minilm, target, kw, message):
    with pytest.raises(AdapterError, match=message) as info:
        plan_sharding(minilm, target, batch=8, seq=128, **kw)
    assert info.value.hint


# --------------------------------------------------------------------------- (d) the numbers follow the formula


def test_single_device_compute_is_the_op_library_roofline(minilm):
    profile = load_profile("nvidia-a100")
    total = 0.0
    for node in minilm.graph:
        try:
            cost = node_cost(node, {"batch": 8, "seq": 128})
        except KeyError:
            continue
        total += max((cost.flops or 0) / profile.peak("fp32"), (cost.bytes or 0) / profile.memory_bandwidth)
    plan = plan_sharding(minilm, "1xnvidia-a100", batch=8, seq=128)
    assert plan.estimate["compute_ms"] == pytest.approx(total * 1e3, rel=1e-9)
    assert plan.estimate["total_ms"] == plan.estimate["compute_ms"]
    assert plan.estimate["tp_comm_ms"] == plan.estimate["pp_comm_ms"] == 0


def test_tensor_parallel_communication_by_hand(minilm):
    plan = plan_sharding(minilm, "2xnvidia-a100", batch=8, seq=128, tp=2)
    # per block two ring all-reduces of the hidden state, plus one after the vocabulary-split embedding
    message = 8 * 128 * 384 * 4  # batch x seq x hidden x fp32 bytes
    one = 5e-6 + 2 * (2 - 1) / 2 * message / 300e9  # alpha + 2(tp-1)/tp x bytes / NVLink bandwidth
    assert plan.estimate["tp_comm_ms"] == pytest.approx(13 * one * 1e3, rel=1e-9)
    assert plan.estimate["total_ms"] == pytest.approx(plan.estimate["compute_ms"] + plan.estimate["tp_comm_ms"])
    fp16 = plan_sharding(minilm, "2xnvidia-a100", batch=8, seq=128, tp=2, precision="fp16")
    assert fp16.estimate["tp_comm_ms"] == pytest.approx(13 * (5e-6 + message / 2 / 300e9) * 1e3, rel=1e-9)


def test_pipeline_schedule_by_hand(minilm):
    plan = plan_sharding(minilm, "2xnvidia-a100-pcie", batch=8, seq=128, tp=1, pp=2, microbatches=4)
    steps = [s.step_ms for s in plan.stages]
    assert plan.estimate["total_ms"] == pytest.approx((4 + 2 - 1) * max(steps))
    assert plan.estimate["bubble"] == pytest.approx(1 / 5)
    assert plan.microbatch_size == 2 and sum(s.layers[1] - s.layers[0] for s in plan.stages) == 6
    # stage 0's step = its roofline compute (2-sample microbatch) + one send over PCIe: alpha + bytes / 32 GB/s
    facts, profile = analyze(minilm), load_profile("nvidia-a100-pcie")
    start, stop = plan.stages[0].layers
    compute = 0.0
    for node, part in zip(facts.nodes, facts.part, strict=True):
        if part == -1 or start <= part < stop:
            try:
                cost = node_cost(node, {"batch": 2, "seq": 128})
            except KeyError:
                continue
            compute += max((cost.flops or 0) / profile.peak("fp32"), (cost.bytes or 0) / profile.memory_bandwidth)
    sent = (plan.stages[0].step_ms * 1e-3 - compute - 10e-6) * 32e9
    hidden, mask = 2 * 128 * 384 * 4, 2 * 128 * 128 * 4  # hidden state and the extended attention mask, fp32
    assert hidden + mask <= sent <= hidden + mask + 4096  # plus the (2, 128) int64 ids and shape scalars


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def plan_cli(cli):
    from adapter.cli.main import cli as group
    from adapter.cli.plan import plan

    if "plan" not in group.commands:
        group.add_command(plan)
    return cli


def test_cli_prints_plan_and_candidates(plan_cli, gpt2_wide):
    code, out, err = plan_cli("plan", gpt2_wide[1], "--target", "4xnvidia-a100-pcie", "--batch", "8", "--seq", "128")
    assert code == 0, err
    assert "plan: tp=1 pp=4" in out and "Candidates" in out and "Stages of the plan" in out
    for row in ("chosen", "PCIe Gen4"):
        assert row in out
    code, out, _ = plan_cli("plan", gpt2_wide[1], "-t", "2xnvidia-a100", "--tp", "2", "--json")
    data = json.loads(out)
    assert code == 0 and (data["tp"], data["pp"]) == (2, 1) and data["candidates"][0]["fits"]


def test_cli_errors_without_traceback(plan_cli, gpt2_wide):
    code, _, err = plan_cli("plan", gpt2_wide[1], "--target", "3xnvidia-a100", "--tp", "3")
    assert code == 1 and "tp=3 does not divide the 16 attention heads" in err and "Traceback" not in err
    code, _, err = plan_cli("plan", gpt2_wide[1], "--target", "four-gpus")
    assert code == 1 and "<N>x<profile>" in err
