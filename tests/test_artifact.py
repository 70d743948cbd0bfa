"""Engine artifacts: atomic publication, checksums, and the content-hash cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adapter import ConvertOptions, Tolerance, convert, load
from adapter.core import artifact
from adapter.core.errors import AdapterError, ArtifactError

FAST = ConvertOptions(benchmark=False)


@pytest.fixture(autouse=True)
def _own_cache(fresh_cache):
    return fresh_cache


def test_artifact_contents_and_manifest(tmp_path):
    result = convert("models:mlp", tmp_path / "e", FAST)
    manifest = result.manifest
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == [
        "manifest.json",
        "model.onnx",
        "model.ort-optimized.onnx",
    ]
    assert set(manifest["files"]) == {"model.onnx", "model.ort-optimized.onnx"}
    assert manifest["source"]["kind"] == "factory" and len(manifest["source"]["digest"]) == 64
    assert manifest["backend"]["name"] == "onnxruntime" and manifest["backend"]["version"]
    assert manifest["libraries"]["torch"].startswith("2.13")
    assert manifest["inputs"] == [
        {"name": "x", "dtype": "float32", "shape": [{"name": "batch", "min": 1, "max": 4096}, 8]}
    ]
    assert [p["name"] for p in manifest["passes"]][0] == "constant-folding"
    assert manifest["verification"]["passed"] is True
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folders left behind"


def test_second_convert_is_a_cache_hit_and_skips_export(tmp_path, monkeypatch):
    first = convert("models:mlp", tmp_path / "a", FAST)
    assert not first.cache_hit

    import adapter.converter.api

    def no_export(*_a, **_k):
        raise AssertionError("a cache hit must not export again")

    monkeypatch.setattr(adapter.converter.api, "import_source", no_export)
    again = convert("models:mlp", tmp_path / "a", FAST)
    assert again.cache_hit and "output folder" in again.cache_note
    elsewhere = convert("models:mlp", tmp_path / "b", FAST)
    assert elsewhere.cache_hit and "cache entry" in elsewhere.cache_note
    assert artifact.validate(tmp_path / "b")["cache_key"] == first.manifest["cache_key"]


@pytest.mark.parametrize(
    "change",
    [
        {"tolerance": Tolerance(atol=2e-4)},
        {"passes": ("none",)},
        {"dynamic": ("x:0=batch[1..32]",)},
        {"verify_samples": 3},
        {"backend_options": (("optimization", "basic"),)},
        {"target": "intel-xeon-spr"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_changing_one_option_misses(tmp_path, change):
    base = convert("models:mlp", tmp_path / "a", FAST)
    changed = convert("models:mlp", tmp_path / "b", ConvertOptions(benchmark=False, **change))
    assert not changed.cache_hit
    assert changed.manifest["cache_key"] != base.manifest["cache_key"]


def test_changed_weights_miss(tmp_path):
    factory = tmp_path / "f.py"
    factory.write_text(
        "import torch\n\ndef make():\n    torch.manual_seed(SEED)\n    return torch.nn.Linear(4, 2).eval(), (torch.randn(2, 4),)\n\nSEED = 0\n"
    )
    first = convert(f"{factory}:make", tmp_path / "a", FAST)
    factory.write_text(factory.read_text().replace("SEED = 0", "SEED = 1"))
    second = convert(f"{factory}:make", tmp_path / "a", FAST)
    assert not second.cache_hit and second.manifest["source"]["digest"] != first.manifest["source"]["digest"]


def test_corrupted_cache_entry_is_detected_and_rebuilt(tmp_path):
    first = convert("models:mlp", tmp_path / "a", FAST)
    entry = artifact.cache_root() / "engines" / first.manifest["cache_key"]
    model = entry / "model.onnx"
    model.write_bytes(model.read_bytes()[:-10] + b"0123456789")
    again = convert("models:mlp", tmp_path / "b", FAST)
    assert not again.cache_hit and "corrupted" in again.cache_note
    artifact.validate(entry)  # rebuilt entry is whole again


def test_validate_names_changed_and_extra_files(tmp_path):
    convert("models:mlp", tmp_path / "e", FAST)
    (tmp_path / "e" / "model.onnx").write_bytes(b"junk")
    (tmp_path / "e" / "extra.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="changed model.onnx, unexpected extra.bin"):
        load(tmp_path / "e")


def test_failed_convert_keeps_the_old_artifact(tmp_path):
    good = convert("models:mlp", tmp_path / "e", FAST)
    with pytest.raises(AdapterError):
        convert("models:custom_ops", tmp_path / "e", FAST)
    assert artifact.validate(tmp_path / "e")["cache_key"] == good.manifest["cache_key"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_publish_replaces_atomically(tmp_path):
    dest = tmp_path / "dest"
    for generation in range(2):
        with artifact.staging_dir(dest) as staged:
            (staged / "model.onnx").write_text(str(generation))
            artifact.write_manifest(staged, {"generation": generation})
            artifact.publish(staged, dest)
    assert json.loads((dest / "manifest.json").read_text())["generation"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]


def test_cache_folder_is_private():
    assert artifact.cache_root().stat().st_mode & 0o077 == 0


def test_engine_round_trip_matches_eager(tmp_path):
    import torch
    from models import mlp

    convert("models:mlp", tmp_path / "e", FAST)
    engine = load(tmp_path / "e")
    module, _, _ = mlp()
    x = np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    got = engine.run({"x": x})["output"]
    np.testing.assert_allclose(got, want, rtol=1.3e-6, atol=1e-5)


def _weights_factory(folder):
    """A factory reading a config with open() and weights through safetensors' native code."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file({"weight": torch.randn(2, 4), "bias": torch.randn(2)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"in": 4, "out": 2}')
    factory = folder / "factory.py"
    factory.write_text(
        "import json, pathlib, torch\n"
        "from safetensors.torch import load_file\n"
        "HERE = pathlib.Path(__file__).parent\n\n"
        "def make():\n"
        "    config = json.loads((HERE / 'config.json').read_text())\n"
        "    layer = torch.nn.Linear(config['in'], config['out'])\n"
        "    layer.load_state_dict(load_file(str(HERE / 'model.safetensors')))\n"
        "    return layer.eval(), (torch.randn(2, 4),)\n"
    )
    return f"{factory}:make"


def test_repeat_convert_skips_the_factory_until_an_input_file_changes(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    import adapter.converter.api

    spec = _weights_factory(tmp_path)
    first = convert(spec, tmp_path / "e", FAST)
    calls = []
    real_prepare = adapter.converter.api.prepare_source
    monkeypatch.setattr(adapter.converter.api, "prepare_source", lambda *a, **k: calls.append(1) or real_prepare(*a, **k))
    assert convert(spec, tmp_path / "e", FAST).cache_hit and not calls  # served from the index

    save_file({"weight": torch.zeros(2, 4), "bias": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    changed = convert(spec, tmp_path / "e", FAST)
    assert calls and not changed.cache_hit
    assert changed.manifest["source"]["digest"] != first.manifest["source"]["digest"]
    x = np.ones((2, 4), np.float32)  # nn.Linear's forward names its argument "input"
    np.testing.assert_allclose(load(tmp_path / "e").run({"input": x})["output"], np.ones((2, 2)), atol=1e-6)
