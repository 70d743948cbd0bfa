"""The CLI surface: help with examples, targets, probe, info, run, JSON output."""

from __future__ import annotations

import json

import numpy as np
import pytest

COMMANDS = [(), ("convert",), ("run",), ("targets",), ("targets", "probe"), ("info",)]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "adapter")
def test_every_command_has_help_with_an_example(cli, command):
    code, out, _ = cli(*command, "--help")
    assert code == 0
    assert "Example" in out and "adapter " in out


def test_targets_lists_every_profile(cli):
    code, out, err = cli("targets", "--json")
    assert code == 0, err
    rows = {row["name"]: row for row in json.loads(out)}
    for name in (
        "intel-xeon-spr",
        "amd-epyc-genoa",
        "amd-epyc-rome",
        "arm-cortex-a76",
        "nvidia-a100",
        "nvidia-h100",
        "nvidia-jetson-orin",
        "amd-mi250x",
        "amd-mi300x",
        "host",
    ):
        assert name in rows
    assert rows["nvidia-h100"]["peak_flops"]["fp8"] > rows["nvidia-a100"]["peak_flops"]["bf16"]
    code, table, _ = cli("targets")
    assert code == 0 and "intel-xeon-spr" in table


def test_probe_reports_measured_figures(cli):
    code, out, err = cli("targets", "probe", "--json")
    assert code == 0, err
    host = json.loads(out)
    assert host["name"] == "host"
    assert host["peak_flops"]["fp32"] > 1e9 and host["memory_bandwidth"] > 1e9


def test_unknown_backend_is_a_clear_error(cli, tmp_path):
    code, _, err = cli("convert", "models:mlp", "--backend", "warp-drive", "-o", tmp_path / "o")
    assert code == 5 and "Unknown backend 'warp-drive'" in err and "onnxruntime" in err


def test_convert_info_run_round_trip(cli, tmp_path, fresh_cache):
    out = tmp_path / "mlp"
    code, stdout, err = cli("convert", "models:mlp", "-o", out)
    assert code == 0, err
    assert "converted and verified" in stdout and "Verification" in stdout and "Latency" in stdout
    code, info, _ = cli("info", out, "--json")
    manifest = json.loads(info)
    assert manifest["latency"]["engine_ms"] > 0 and manifest["verification"]["passed"]
    np.savez(tmp_path / "x.npz", x=np.ones((4, 8), np.float32))
    code, ran, err = cli("run", out, "--inputs", tmp_path / "x.npz", "--json")
    assert code == 0, err
    assert json.loads(ran)["output"]["shape"] == [4, 4]
