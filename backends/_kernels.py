"""The Triton kernels a GPU artifact carries (``adapter.kernels``): for NVIDIA and AMD targets,
the graph's fused patterns are matched (``kernels.plan``), each kernel's tile space ranked
for the target (``kernels.tuning``) and the best configuration compiled for the profile's
architecture into the artifact's ``kernels/`` folder (cubin + PTX, or hsaco + AMDGCN), with
launch metadata and the predicted fraction of peak. The recipe backends (TensorRT, MIGraphX)
name them as ahead-of-time plugins (``adapter::<kernel>``) for the nodes they serve.
"""

from __future__ import annotations

__all__ = ["KERNELS_DIR", "attach_kernels", "example_sizes"]

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx_ir as ir

from adapter.core.errors import AdapterError
from adapter.core.specs import Dim, TensorSpec

try:  # Triton (a Linux wheel) compiles the kernels; without it GPU artifacts are written without them
    from adapter.kernels.aot import bundle
    from adapter.kernels.plan import Found, problems_in
    from adapter.kernels.tuning import LIMITS
except ImportError as exc:  # pragma: no cover - triton is a pinned dependency on Linux
    bundle = problems_in = None
    Found = Any
    LIMITS = {}
    _MISSING = f"the Triton kernels need triton ({exc})"
else:
    _MISSING = None

KERNELS_DIR = "kernels"
_DTYPE = {"fp16": "fp16", "bf16": "bf16"}


def example_sizes(inputs: list[TensorSpec], shapes: Mapping[str, Any]) -> dict[str, int]:
    """Dim name -> size from fixed example shapes (``shapes``: input name -> shape)."""
    sizes: dict[str, int] = {}
    for spec in inputs:
        for dim, size in zip(spec.shape, shapes.get(spec.name, ())):
            if isinstance(dim, Dim):
                sizes[dim.name] = int(size)
    return sizes


def attach_kernels(graph: ir.Model, profile: Any, sizes: Mapping[str, int], precision: str, workdir: Path,
                   found: Mapping[str, Found] | None = None) -> dict:  # fmt: skip
    """Bundle the kernels ``graph`` can use for ``profile`` (``found``: the patterns already
    matched, else ``kernels.plan.problems_in`` at ``sizes``); the backend config's
    ``triton_kernels`` and ``plugins`` (empty when the target has no Triton architecture or
    nothing matched)."""
    if getattr(profile, "kind", "") != "gpu":
        return {}
    if _MISSING or profile.arch not in LIMITS:
        return {"triton_kernels": [], "plugins": [], "kernels_note": _MISSING or f"no tile limits for {profile.arch}"}
    found = problems_in(graph, sizes) if found is None else found
    if not found:
        return {"triton_kernels": [], "plugins": []}
    dtype = _DTYPE.get(precision, "fp32")
    try:  # the kernels are an addition: a kernel that fits no tile or does not compile leaves the engine as it is
        entries = bundle(Path(workdir) / KERNELS_DIR, profile, {k: (f.kernel, f.problem) for k, f in found.items()},
                         dtype)  # fmt: skip
    except AdapterError as exc:
        return {"triton_kernels": [], "plugins": [], "kernels_note": f"no Triton kernels bundled: {exc}"}
    plugins = []
    for entry in entries:
        item = found.get(entry.get("companion_of") or entry["name"])
        entry["files"] = [f"{KERNELS_DIR}/{name}" for name in entry["files"]]
        if "companion_of" not in entry:
            entry["nodes"] = item.nodes
            plugins.append({"plugin": f"adapter::{entry['name']}", "replaces": sorted(set(item.ops)), "nodes": len(item.nodes),
                            "binary": entry["files"][0], "symbol": entry["symbol"]})  # fmt: skip
    return {"triton_kernels": entries, "plugins": plugins}
