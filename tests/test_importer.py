"""The importer keeps each node's nn.Module path and records input/output specs."""

from __future__ import annotations

import onnx
import pytest

from adapter import ConvertOptions, convert
from adapter.converter.importer import import_source
from adapter.core.specs import Dim, TensorSpec, parse_dynamic


def test_module_paths_survive_into_the_artifact(tmp_path):
    convert("models:mlp", tmp_path / "e", ConvertOptions(benchmark=False))
    model = onnx.load(str(tmp_path / "e" / "model.onnx"))
    modules = {p.value for n in model.graph.node for p in n.metadata_props if p.key == "adapter.module"}
    assert {"fc1", "fc2"} <= modules


def test_specs_record_names_dtypes_and_dynamic_dims():
    imported = import_source("models:mlp", parse_dynamic(["x:0=batch[1..16]"]))
    assert imported.inputs == [TensorSpec("x", "float32", (Dim("batch", 1, 16), 8))]
    assert imported.outputs == [TensorSpec("output", "float32", (Dim("batch", 1, 16), 4))]
    assert imported.model.graph.inputs[0].shape[0].value == "batch"  # symbols renamed to the user's names


def test_shared_dim_names_are_one_symbol():
    parsed = parse_dynamic(["input_ids:0=batch,1=seq[1..512]", "attention_mask:0=batch,1=seq"])
    assert parsed["attention_mask"][1] == Dim("seq", 1, 512)
    assert parsed["input_ids"][0] is not None and parsed["input_ids"][0].name == "batch"


@pytest.mark.parametrize("bad", ["x", "x:", "x:0", "x:a=batch", "x:0=batch[5..2]", "x:0=9lives"])
def test_dynamic_syntax_errors(bad):
    from adapter.core.errors import SourceError

    with pytest.raises(SourceError):
        parse_dynamic([bad])


def test_conflicting_ranges_for_one_dim():
    from adapter.core.errors import SourceError

    with pytest.raises(SourceError, match="two ranges"):
        parse_dynamic(["a:0=batch[1..4]", "b:0=batch[1..8]"])
