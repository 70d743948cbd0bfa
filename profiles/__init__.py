"""Hardware target profiles: one TOML data file per device, plus the measured ``host``.

A profile holds the figures the cost model, the roofline and the pass pipeline read:
peak FLOP/s per dtype (dense), memory bandwidth and size, the interconnect to peer
devices, the precisions the hardware computes in natively, and the default backend
with per-backend options. Bundled profiles live next to this module as
``<name>.toml``; ``host`` is measured on the spot by :func:`adapter.profiles.probe.probe_host`.

Example:
    >>> from adapter.profiles import load_profile
    >>> load_profile("nvidia-a100").peak("fp16")
    312000000000000.0
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from adapter.profiles import probe
from adapter.profiles.schema import DTYPES, HOST, Interconnect, Profile, _error

__all__ = ["DTYPES", "HOST", "Interconnect", "Profile", "list_profiles", "load_profile"]

_DATA_DIR = Path(__file__).resolve().parent


def list_profiles() -> list[str]:
    """Return the names of the bundled profiles, sorted, followed by ``"host"``."""
    return [*sorted(p.stem for p in _DATA_DIR.glob("*.toml")), HOST]


def load_profile(name_or_path: str | os.PathLike[str]) -> Profile:
    """Load a bundled profile by name, measure ``"host"``, or read a ``.toml`` file.

    Args:
        name_or_path: A name from :func:`list_profiles`, or a path to a profile file.

    Returns:
        The validated profile.

    Raises:
        ProfileError: The name is unknown, or the file is unreadable or malformed.
    """
    text = os.fspath(name_or_path)
    if text == HOST:
        return probe.probe_host()
    is_path = isinstance(name_or_path, os.PathLike) or text.endswith(".toml") or os.sep in text or "/" in text
    path = Path(text) if is_path else _DATA_DIR / f"{text}.toml"
    if not is_path and not path.is_file():
        raise _error(
            f"Unknown profile '{text}'. Known profiles: {', '.join(list_profiles())}.",
            "Pass one of these names, or a path to a .toml profile file.",
        )
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise _error(
            f"{path}: cannot read profile file ({exc.strerror or exc}).",
            f"Known profiles: {', '.join(list_profiles())}.",
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise _error(f"{path}: not valid TOML ({exc}).") from None
    return Profile.from_dict(data, origin=str(path))
