"""The profile schema: the ``Profile`` record, its fields' checks and units."""


from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from types import MappingProxyType
from typing import Any

from adapter.core.errors import ProfileError

__all__ = ["DTYPES", "HOST", "Interconnect", "Profile"]

HOST = "host"
"""Name of the profile measured on this machine rather than read from a file."""

DTYPES = ("fp64", "fp32", "tf32", "fp16", "bf16", "fp8", "int8", "int4")
"""Dtype names a profile may use in ``peak_flops`` and ``precisions``."""

_KINDS = ("cpu", "gpu")
_ALIASES = {
    "float64": "fp64",
    "float32": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
}


def _error(message: str, hint: str | None = None) -> Exception:
    return ProfileError(message, hint)


def _allowed_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({str(k): _freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class Interconnect:
    """The link from this device to its peers.

    Attributes:
        name: Link technology and width, e.g. ``"NVLink 3, 12 links"``.
        bandwidth: Aggregate bandwidth to peers in bytes/s, per direction.
    """

    name: str
    bandwidth: float


@dataclass(frozen=True)
class Profile:
    """A hardware target: figures and backend choices, immutable.

    Attributes:
        name: Profile name (the data file's stem, or ``"host"``).
        description: One line naming the exact part (SKU, form factor, memory).
        kind: ``"cpu"`` or ``"gpu"``.
        vendor: Lower-case vendor name, e.g. ``"nvidia"``.
        arch: Compiler target name: LLVM ``-mcpu`` for CPUs, ``sm_XX``/``gfxXXX`` for GPUs.
        peak_flops: Dense peak FLOP/s (OP/s for integers) per dtype name in ``DTYPES``.
        memory_bandwidth: Peak memory bandwidth in bytes/s.
        memory_size: Memory size in bytes.
        interconnect: Link to peer devices.
        precisions: Dtypes the hardware computes in natively.
        default_backend: Backend used when none is chosen; a key of ``backends``, or
            ``auto`` (build every listed backend adapter implements, keep the fastest).
        backends: Options per backend name (TVM target dict, ORT providers, TensorRT flags).
        sources: Where the figures come from.
        cores: CPU cores (CPUs only).
        compute_units: Streaming multiprocessors or compute units (GPUs only).
        features: ISA features relevant to code generation, e.g. ``"amx_bf16"``.
    """

    name: str
    description: str
    kind: str
    vendor: str
    arch: str
    peak_flops: Mapping[str, float]
    memory_bandwidth: float
    memory_size: int
    interconnect: Interconnect
    precisions: tuple[str, ...]
    default_backend: str
    backends: Mapping[str, Mapping[str, Any]]
    sources: tuple[str, ...]
    cores: int | None = None
    compute_units: int | None = None
    features: tuple[str, ...] = ()

    def __hash__(self) -> int:
        return hash(self.digest())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str = "<dict>") -> Profile:
        """Validate a profile table and build a :class:`Profile` from it.

        Args:
            data: The parsed TOML (or JSON) table.
            origin: File or label named in error messages.

        Returns:
            The validated profile.

        Raises:
            ProfileError: A key is missing, unknown, of the wrong type or not positive.
        """
        check = _Checker(data, origin)
        kind = check.choice("kind", _KINDS)
        peaks = check.table("peak_flops")
        if not peaks:
            raise _error(f"{origin}: key 'peak_flops' is empty.", "List at least 'fp32'.")
        inter = check.table("interconnect")
        backends = check.table("backends")
        default = check.string("default_backend")
        if default != "auto" and default not in backends:
            raise _error(
                f"{origin}: key 'default_backend' names '{default}', which has no [backends.{default}] table.",
                "Add the table, even if empty.",
            )
        unit_key = "cores" if kind == "cpu" else "compute_units"
        return cls(
            name=check.string("name"),
            description=check.string("description"),
            kind=kind,
            vendor=check.string("vendor"),
            arch=check.string("arch"),
            peak_flops=_freeze(
                {check.dtype(f"peak_flops.{k}", k): check.positive(f"peak_flops.{k}", v) for k, v in peaks.items()}
            ),
            memory_bandwidth=check.positive("memory_bandwidth"),
            memory_size=check.count("memory_size"),
            interconnect=Interconnect(
                name=check.string("interconnect.name", inter.get("name")),
                bandwidth=check.positive("interconnect.bandwidth", inter.get("bandwidth")),
            ),
            precisions=tuple(check.dtype(f"precisions[{i}]", p) for i, p in enumerate(check.strings("precisions"))),
            default_backend=default,
            backends=_freeze({k: check.table(f"backends.{k}", v) for k, v in backends.items()}),
            sources=check.strings("sources"),
            cores=check.count(unit_key) if kind == "cpu" else None,
            compute_units=check.count(unit_key) if kind == "gpu" else None,
            features=check.strings("features", data.get("features", []), empty=True),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the profile as plain JSON-ready data (the TOML layout, unset keys omitted)."""
        data: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "kind": self.kind,
            "vendor": self.vendor,
            "arch": self.arch,
            "peak_flops": _thaw(self.peak_flops),
            "memory_bandwidth": self.memory_bandwidth,
            "memory_size": self.memory_size,
            "interconnect": {
                "name": self.interconnect.name,
                "bandwidth": self.interconnect.bandwidth,
            },
            "precisions": list(self.precisions),
            "default_backend": self.default_backend,
            "backends": _thaw(self.backends),
            "sources": list(self.sources),
            "features": list(self.features),
        }
        if self.cores is not None:
            data["cores"] = self.cores
        if self.compute_units is not None:
            data["compute_units"] = self.compute_units
        return data

    def digest(self) -> str:
        """Return the sha256 hex digest of the canonical JSON of the contents (a cache key)."""
        text = json.dumps(
            self.to_dict(),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
            allow_nan=False,
        )
        return hashlib.sha256(text.encode("ascii")).hexdigest()

    def peak(self, dtype: str) -> float:
        """Return the dense peak FLOP/s (OP/s for integer dtypes) for ``dtype``.

        Args:
            dtype: A name from ``DTYPES`` or a common alias (``"float32"``, ``"bfloat16"``).

        Raises:
            ProfileError: The profile has no figure for this dtype.
        """
        key = _ALIASES.get(dtype, dtype)
        if key not in self.peak_flops:
            raise _error(
                f"Profile '{self.name}' has no peak figure for '{dtype}'; it has {', '.join(self.peak_flops)}.",
                "Choose one of those precisions.",
            )
        return self.peak_flops[key]

    @property
    def threads(self) -> int:
        """CPU threads an engine for this target should use.

        The profile's cores for CPU targets (for ``host``, the CPUs this process may run
        on); for GPU targets, the CPUs this process may run on, for host-side work.
        """
        if self.kind == "cpu" and self.cores:
            return self.cores
        return _allowed_cpus()


_REQUIRED = tuple(f.name for f in fields(Profile) if f.default is MISSING)
_OPTIONAL = tuple(f.name for f in fields(Profile) if f.default is not MISSING)


class _Checker:
    """Reads keys from one profile table, raising ProfileError naming origin and key."""

    def __init__(self, data: Mapping[str, Any], origin: str) -> None:
        if not isinstance(data, Mapping):
            raise _error(f"{origin}: a profile must be a table of keys.")
        self.data, self.origin = data, origin
        for key in _REQUIRED:
            if key not in data:
                raise _error(
                    f"{origin}: missing required key '{key}'.",
                    f"Every profile needs: {', '.join(_REQUIRED)}.",
                )
        for key in data:
            if key not in _REQUIRED + _OPTIONAL:
                raise _error(
                    f"{origin}: unknown key '{key}'.",
                    f"Known keys: {', '.join(_REQUIRED + _OPTIONAL)}.",
                )

    _MISSING = object()

    def _get(self, key: str, value: Any) -> Any:
        if value is self._MISSING:
            value = self.data.get(key)
        if value is None:
            raise _error(f"{self.origin}: missing required key '{key}'.")
        return value

    def _bad(self, key: str, expected: str, value: Any) -> Exception:
        return _error(f"{self.origin}: key '{key}' must be {expected}, got {value!r}.")

    def string(self, key: str, value: Any = _MISSING) -> str:
        value = self._get(key, value)
        if not isinstance(value, str) or not value.strip():
            raise self._bad(key, "a non-empty string", value)
        return value

    def strings(self, key: str, value: Any = _MISSING, empty: bool = False) -> tuple[str, ...]:
        value = self._get(key, value)
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value) or not (value or empty):
            raise self._bad(key, "a list of strings" if empty else "a non-empty list of strings", value)
        return tuple(value)

    def positive(self, key: str, value: Any = _MISSING) -> float:
        value = self._get(key, value)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
            raise self._bad(key, "a positive number", value)
        return float(value)

    def count(self, key: str) -> int:
        value = self._get(key, self._MISSING)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self._bad(key, "a positive integer", value)
        return value

    def table(self, key: str, value: Any = _MISSING) -> Mapping[str, Any]:
        value = self._get(key, value)
        if not isinstance(value, Mapping):
            raise self._bad(key, "a table", value)
        return value

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self.string(key)
        if value not in choices:
            raise self._bad(key, f"one of {', '.join(choices)}", value)
        return value

    def dtype(self, key: str, value: str) -> str:
        if value not in DTYPES:
            raise self._bad(key, f"a dtype name ({', '.join(DTYPES)})", value)
        return value


