"""The sharded artifact as the ranks see it: its manifest (checked), labels, weights per
rank, microbatches, inputs and outputs on disk, and the fault-injection test hook
(``ADAPTER_FAULT``; see :mod:`adapter.runtime.worker`)."""

from __future__ import annotations

__all__ = [
    "FAULT_ENV", "Fault", "peers_label", "load_inputs", "microbatch_count", "parse_fault", "rank_label", "read_sharded", "save_outputs",
    "split_microbatches", "weights_bytes",
]  # fmt: skip

import json
import os
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapter.core import safety as _safety
from adapter.core.errors import AdapterError, ArtifactError, InputMismatchError
from adapter.core.specs import TensorSpec, check_inputs

FAULT_ENV = "ADAPTER_FAULT"
"""Environment variable of the fault-injection test hook."""


# --------------------------------------------------------------------------- manifest


def read_sharded(folder: Path) -> dict[str, Any]:
    """Read a sharded artifact's manifest and check its rank table.

    Raises:
        ArtifactError: No manifest, not a sharded artifact, or an inconsistent rank table.
    """
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise ArtifactError(
            f"'{folder}' has no manifest.json, so it is not a sharded artifact.",
            "Create one with the sharding passes (adapter convert --tp/--pp).",
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"'{path}' is not valid JSON ({exc}).") from exc
    if not isinstance(manifest, dict) or manifest.get("kind") != "sharded":
        raise ArtifactError(
            f'\'{folder}\' is not a sharded artifact (its manifest has no "kind": "sharded").',
            "Run single-engine artifacts with `adapter run`.",
        )
    problems = []
    for key in ("world_size", "ranks", "inputs", "outputs"):
        if key not in manifest:
            problems.append(f"no '{key}'")
    if problems:
        raise ArtifactError(f"The manifest of '{folder}' is incomplete: {', '.join(problems)}.")
    world = int(manifest["world_size"])
    ranks = sorted(manifest["ranks"], key=lambda r: r["rank"])
    if [r["rank"] for r in ranks] != list(range(world)):
        problems.append(f"ranks {[r['rank'] for r in ranks]} are not 0..{world - 1}")
    for spec in ranks:
        for step in spec.get("steps", []):
            if step.get("op") not in ("run", "all_reduce", "all_gather"):
                problems.append(f"rank {spec['rank']} has an unknown step op '{step.get('op')}'")
            elif step["op"] == "run":
                where = (folder / step["engine"]["folder"]).resolve()
                if not where.is_relative_to(folder.resolve()):
                    problems.append(
                        f"rank {spec['rank']}'s engine folder '{step['engine']['folder']}' leaves the artifact"
                    )
                elif not where.is_dir():
                    problems.append(f"rank {spec['rank']}'s engine folder '{step['engine']['folder']}' is missing")
        for peer in ("recv_from", "send_to"):
            if spec.get(peer) is not None and not 0 <= spec[peer] < world:
                problems.append(f"rank {spec['rank']} has {peer} {spec[peer]} outside the world")
        if spec["rank"] not in spec.get("tp_group", [spec["rank"]]):
            problems.append(f"rank {spec['rank']} is not in its own tp_group")
    writers = [r["rank"] for r in ranks if r.get("outputs") and r.get("tp_rank", 0) == 0]
    if len(writers) != 1:
        problems.append(f"{len(writers)} ranks would write the outputs (want one: the last stage's tp_rank 0)")
    if problems:
        raise ArtifactError(
            f"The sharded manifest of '{folder}' is inconsistent: {'; '.join(problems)}.", "Re-create the artifact."
        )
    manifest["ranks"] = ranks
    return manifest


def rank_label(manifest: dict[str, Any], rank: int) -> str:
    """``rank 2 (stage 1, tp 0)``."""
    spec = manifest["ranks"][rank]
    return f"rank {rank} (stage {spec.get('stage', 0)}, tp {spec.get('tp_rank', 0)})"


def peers_label(manifest: dict[str, Any], ranks: list[int]) -> str:
    return ", ".join(rank_label(manifest, r) for r in ranks) or "its peers"


def weights_bytes(folder: Path, manifest: dict[str, Any], rank: int) -> int:
    """Bytes of the weights in a rank's engine files (ONNX initializers; other files by size)."""
    import onnx

    total = 0
    for step in manifest["ranks"][rank].get("steps", []):
        if step["op"] != "run":
            continue
        where = Path(folder) / step["engine"]["folder"]
        model = where / "model.onnx"
        if model.is_file():
            proto = _safety.check_onnx_file(model)
            for tensor in proto.graph.initializer:
                count = int(np.prod(tensor.dims)) if tensor.dims else 1
                total += count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        else:
            total += sum(p.stat().st_size for p in where.rglob("*") if p.is_file())
    return total


def split_microbatches(
    inputs: dict[str, np.ndarray], batch_axis: dict[str, int], count: int
) -> list[dict[str, np.ndarray]]:
    """Split the inputs named in ``batch_axis`` into ``count`` nearly equal parts (others go whole)."""
    split = {name: np.array_split(value, count, axis=batch_axis[name])
             for name, value in inputs.items() if name in batch_axis}  # fmt: skip
    return [{name: (split[name][k] if name in split else value) for name, value in inputs.items()}
            for k in range(count)]  # fmt: skip


def microbatch_count(manifest: dict[str, Any], inputs: dict[str, np.ndarray]) -> int:
    """Microbatches to run: the manifest's count, at most the batch size."""
    wanted = max(1, int(manifest.get("microbatches", 1)))
    sizes = {inputs[n].shape[a] for n, a in manifest.get("batch_axis", {}).items() if n in inputs}
    if not sizes:
        return 1
    if len(sizes) > 1:
        raise InputMismatchError(f"The inputs split into microbatches have different batch sizes: {sorted(sizes)}.")
    return max(1, min(wanted, sizes.pop()))


# --------------------------------------------------------------------------- fault hook


@dataclass(frozen=True)
class Fault:
    """An injected fault (test hook): ``kind`` die or hang, on ``rank``, at ``point``, microbatch ``mb``."""

    kind: str
    rank: int
    point: str = "step0"
    mb: int = 0

    def hit(self, rank: int, point: str, mb: int = 0) -> None:
        if rank != self.rank or point != self.point or (point.startswith("step") and mb != self.mb):
            return
        sys.stderr.write(f"adapter: test hook {FAULT_ENV}: rank {rank} {self.kind}s at {point} (t={time.time():.3f})\n")
        sys.stderr.flush()
        if self.kind == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        while True:  # hang
            time.sleep(3600)


def parse_fault(text: str | None) -> Fault | None:
    """Parse ``die:rank=1,at=step2`` / ``hang:rank=1[,at=...][,mb=K]``; None for empty text.

    Raises:
        AdapterError: The text does not follow that syntax.
    """
    if not text:
        return None
    match = re.fullmatch(r"(die|hang):(.*)", text.strip())
    fields = dict(part.split("=", 1) for part in match.group(2).split(",") if "=" in part) if match else {}
    if not match or "rank" not in fields or set(fields) - {"rank", "at", "mb"}:
        raise AdapterError(f"Cannot read {FAULT_ENV}='{text}'.", "Write die|hang:rank=R[,at=init|stepN|end][,mb=K].")
    point = fields.get("at", "step0")
    if not re.fullmatch(r"init|end|step\d+", point):
        raise AdapterError(f"{FAULT_ENV}: unknown point '{point}'.", "Use init, stepN or end.")
    return Fault(match.group(1), int(fields["rank"]), point, int(fields.get("mb", 0)))


# --------------------------------------------------------------------------- inputs and outputs


def load_inputs(path: Path, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """Read an ``.npz`` feed (never unpickling) and check it against the manifest's input specs.

    Raises:
        InputMismatchError: Unreadable file, or inputs that do not match the specs.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            feed = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise InputMismatchError(
            f"Cannot read the inputs '{path}': {exc}.", "Give an .npz written by numpy.savez."
        ) from exc
    return check_inputs([TensorSpec.from_json(s) for s in manifest["inputs"]], feed)


def save_outputs(path: Path, outputs: dict[str, np.ndarray]) -> None:
    """Write ``outputs`` to ``path`` atomically (a temp file beside it, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **outputs)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
