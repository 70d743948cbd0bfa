"""The backend contract (``adapter.backends.base.Backend``): every registered backend meets
it, a backend that does not is refused, and a backend defined here — ONNX's reference
evaluator as an engine — registered with one line shows up in ``adapter check``, ``adapter
ops`` and ``--backend auto`` with nothing else changed."""

from __future__ import annotations

import json
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx.reference import ReferenceEvaluator

from adapter import backends
from adapter.backends import BACKENDS, llamacpp, register
from adapter.backends.base import Backend, EngineBase, Support, check_backend, profile_options
from adapter.core.onnx_io import save_model

PROFILES = Path(backends.__file__).resolve().parent.parent / "profiles"


def test_every_registered_backend_meets_the_contract():
    assert list(BACKENDS) == ["onnxruntime", "openvino", "tvm", "tensorrt", "migraphx", "edge", "llamacpp"]
    for name, backend in BACKENDS.items():
        assert isinstance(backend, Backend), name
        assert check_backend(backend) == [], name
        assert backend.NAME == name


def test_a_backend_missing_part_of_the_contract_is_refused():
    incomplete = types.SimpleNamespace(NAME="half", PASSES=(), version=lambda: "0")
    with pytest.raises(TypeError, match="missing PRECISIONS.*missing compile"):
        register(incomplete)
    wrong = types.SimpleNamespace(**{**vars(_toy()), "DEVICE": "tpu", "AUTO_KINDS": frozenset({"fpga"})})
    with pytest.raises(TypeError, match="DEVICE must be one of.*AUTO_KINDS must be"):
        register(wrong)
    assert "half" not in BACKENDS and "toy" not in BACKENDS


def test_a_decoder_missing_part_of_its_contract_is_refused():
    builder = types.SimpleNamespace(**{k: v for k, v in vars(llamacpp.DECODER).items() if k != "AUTO_KINDS"})
    incomplete = types.SimpleNamespace(**{**vars(_toy()), "DECODER": builder})
    assert check_backend(incomplete) == ["DECODER lacks AUTO_KINDS"]
    odd = types.SimpleNamespace(**{**vars(builder), "AUTO_KINDS": frozenset(), "SOURCE": "tensors"})
    wrong = types.SimpleNamespace(**{**vars(_toy()), "DECODER": odd})
    assert check_backend(wrong) == ["DECODER.SOURCE must be one of ('graph', 'weights')"]


# --------------------------------------------------------------------------- the toy backend


@dataclass(frozen=True)
class _Options:
    """No settings."""

    @classmethod
    def from_profile(cls, profile: Any, overrides: dict[str, Any] | None = None) -> _Options:
        return profile_options(cls, "toy", profile, overrides)


class _Engine(EngineBase):
    """ONNX's reference evaluator over the artifact's model."""

    backend = "toy"

    def __init__(self, folder, inputs, outputs, config) -> None:
        super().__init__(folder, inputs, outputs, config)
        self._evaluator = ReferenceEvaluator(onnx.load(str(self.folder / "model.onnx")))

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.outputs]
        return dict(zip(names, self._evaluator.run(names, feed)))


def _supports(node: ir.Node, model: ir.Model, profile: Any = None) -> Support:
    if node.domain not in ("", "ai.onnx"):
        return Support(False, f"the reference evaluator runs standard ONNX only, not {node.domain}")
    return Support(True)


def _compile(model: ir.Model, profile: Any, options: _Options, specs, workdir: Path) -> _Engine:
    workdir.mkdir(parents=True, exist_ok=True)
    files = save_model(model, workdir / "model.onnx")
    return _Engine(workdir, specs[0], specs[1], {"files": files})


def _toy() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        NAME="toy", PASSES=(), PRECISIONS=frozenset({"fp32"}), EMULATES=frozenset(), AUTO_KINDS=frozenset({"cpu"}),
        FIXED_SHAPES=False, BUILD_OPTIONS=frozenset(), DEVICE="cpu", STAND_IN=False, EXTRA="", CAPTURE=None, DECODER=None,
        Options=_Options, Engine=_Engine, version=lambda: onnx.__version__, require=lambda: None,
        supports=_supports, compile=_compile,
    )  # fmt: skip


@pytest.fixture
def toy():
    backend = register(_toy())  # the one line a new backend adds to backends/__init__.py
    yield backend
    BACKENDS.pop("toy")


@pytest.fixture
def cpu_target(tmp_path) -> Path:
    """A bundled CPU profile whose backends table also lists the toy (targets list their backends)."""
    path = tmp_path / "xeon-with-toy.toml"
    path.write_text((PROFILES / "intel-xeon-spr.toml").read_text() + "\n[backends.toy]\n")
    return path


def test_a_registered_backend_is_checked(toy, cli, cpu_target):
    code, out, err = cli("check", "models:mlp", "--target", cpu_target, "--json")
    assert code == 0, err
    found = {b["backend"]: b for b in json.loads(out)["backends"]}
    assert set(found) == {"onnxruntime", "openvino", "toy"}
    assert found["toy"]["runs"] and found["toy"]["nodes"] > 0 and not found["toy"]["refused"]


def test_a_registered_backend_has_an_ops_column(toy, cli):
    code, out, err = cli("ops", "--backend", "toy", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert list(data["backends"]) == ["toy"] and data["backends"]["toy"]["pipeline"] == "canonicalize"
    rows = {r["op"]: r for r in data["ops"]}
    assert rows["MatMul"]["support"]["toy"] is True
    assert rows["com.microsoft::Attention"]["support"]["toy"] is False  # asked live: its supports() refuses


def test_a_registered_backend_races_in_auto(toy, cli, cpu_target, tmp_path):
    out_dir = tmp_path / "engine"
    code, out, err = cli("convert", "models:mlp", "--target", cpu_target, "-o", out_dir, "--no-bench", "--json")
    assert code == 0, err
    backend = json.loads((out_dir / "manifest.json").read_text())["backend"]
    candidates = {c["backend"]: c for c in backend["candidates"]}
    assert set(candidates) == {"onnxruntime", "openvino", "toy"}
    assert candidates["toy"]["verified"] and candidates["toy"]["cosine"] > 0.99999 and candidates["toy"]["latency_ms"] > 0
    # and it builds on its own, and the artifact loads as a toy engine
    code, out, err = cli("convert", "models:mlp", "--target", cpu_target, "--backend", "toy", "-o", tmp_path / "t",
                         "--no-bench")  # fmt: skip
    assert code == 0, err
    engine = backends.get_backend("toy").Engine.load(tmp_path / "t")
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    assert engine.run({"x": x})[engine.outputs[0].name].shape == (3, 4)


def test_precision_modes_come_from_the_declarations(toy, cli, cpu_target, tmp_path):
    code, _, err = cli("convert", "models:mlp", "--target", cpu_target, "--backend", "toy", "--precision", "int8",
                       "-o", tmp_path / "q", "--no-bench")  # fmt: skip
    assert code != 0 and "Traceback" not in err
    assert "toy" in err and "does not run int8" in err
    assert all(name in err for name, b in BACKENDS.items() if "int8" in b.PRECISIONS)
