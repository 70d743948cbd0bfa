"""Tests for the hardware profiles: bundled data files, schema checks and the host probe."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adapter import profiles
from adapter.core.errors import ProfileError
from adapter.profiles import DTYPES, Profile, list_profiles, load_profile
from adapter.profiles import probe as probe_module
from adapter.profiles.probe import probe_host

FIGURES = {"peak_flops": {"fp32": 2e9, "bf16": 3e9}, "memory_bandwidth": 4e9, "copy_bytes": 2**28, "constrained": False}
"""What ``probe._measure`` returns, for tests that stand in for the measurement."""

DATA_DIR = Path(profiles.__file__).parent
BUNDLED = [name for name in list_profiles() if name != "host"]
EXPECTED = {
    "intel-xeon-spr",
    "amd-epyc-genoa",
    "amd-epyc-rome",
    "arm-cortex-a76",
    "nvidia-a100",
    "nvidia-a100-pcie",
    "nvidia-h100",
    "nvidia-jetson-orin",
    "amd-mi250x",
    "amd-mi300x",
}


def _copy_with(tmp_path: Path, name: str, pattern: str, replacement: str) -> Path:
    """Copy a bundled profile to tmp_path, replacing the first line matching pattern."""
    text = (DATA_DIR / f"{name}.toml").read_text()
    new_text, count = re.subn(pattern, replacement, text, count=1, flags=re.MULTILINE)
    assert count == 1, f"pattern {pattern!r} not found in {name}.toml"
    path = tmp_path / f"{name}-edited.toml"
    path.write_text(new_text)
    return path


def test_list_profiles_has_every_target_and_host() -> None:
    names = list_profiles()
    assert set(BUNDLED) == EXPECTED
    assert names[-1] == "host" and names[:-1] == sorted(names[:-1])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bundled_profile_loads_and_validates(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.kind in ("cpu", "gpu")
    assert (profile.cores if profile.kind == "cpu" else profile.compute_units) > 0
    assert profile.peak("fp32") > 1e9
    assert all(dtype in DTYPES and value > 0 for dtype, value in profile.peak_flops.items())
    assert set(profile.precisions) <= set(profile.peak_flops)
    assert profile.memory_bandwidth > 1e8 and profile.memory_size > 2**30
    assert profile.interconnect.bandwidth > 0 and profile.interconnect.name
    assert profile.default_backend == "auto" or profile.default_backend in profile.backends
    assert profile.sources
    assert re.fullmatch(r"[0-9a-f]{64}", profile.digest())
    if profile.kind == "cpu":
        assert profile.threads == profile.cores


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_to_dict_round_trips(name: str) -> None:
    profile = load_profile(name)
    again = Profile.from_dict(profile.to_dict())
    assert again == profile and again.digest() == profile.digest()
    assert hash(again) == hash(profile)


def test_profile_is_immutable() -> None:
    profile = load_profile("nvidia-a100")
    with pytest.raises(AttributeError):
        profile.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        profile.peak_flops["fp32"] = 1.0  # type: ignore[index]


def test_peak_accepts_aliases_and_rejects_missing_dtype() -> None:
    profile = load_profile("nvidia-h100")
    assert profile.peak("bfloat16") == profile.peak("bf16") == 989.5e12
    with pytest.raises(ProfileError, match="int4"):
        profile.peak("int4")


def test_load_by_path_gives_same_digest(tmp_path: Path) -> None:
    copy = tmp_path / "copy.toml"
    shutil.copy(DATA_DIR / "nvidia-a100.toml", copy)
    assert load_profile(copy).digest() == load_profile("nvidia-a100").digest()
    assert load_profile(str(copy)).digest() == load_profile("nvidia-a100").digest()


def test_digest_changes_when_a_figure_changes(tmp_path: Path) -> None:
    edited = _copy_with(tmp_path, "nvidia-a100", r"^memory_bandwidth = .*$", "memory_bandwidth = 1.935e12")
    changed = load_profile(edited)
    assert changed.memory_bandwidth == 1.935e12
    assert changed.digest() != load_profile("nvidia-a100").digest()


def test_unknown_name_lists_known_profiles() -> None:
    with pytest.raises(ProfileError) as info:
        load_profile("nvidia-a999")
    message = str(info.value)
    assert "nvidia-a999" in message
    for name in list_profiles():
        assert name in message


def test_missing_file_path_is_a_profile_error(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"absent\.toml"):
        load_profile(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("pattern", "replacement", "key"),
    [
        (r"^memory_bandwidth = .*$", "", "memory_bandwidth"),
        (r"^fp32 = .*$", "fp32 = -19.5e12", "peak_flops.fp32"),
        (r"^memory_size = .*$", "memory_size = 0", "memory_size"),
        (r"^compute_units = .*$", "compute_units = 1.5", "compute_units"),
        (r"^bandwidth = .*$", "bandwidth = -1", "interconnect.bandwidth"),
        (r"^kind = .*$", 'kind = "tpu"', "kind"),
        (r"^precisions = .*$", 'precisions = ["fp32", "fp4"]', "precisions[1]"),
        (r"^default_backend = .*$", 'default_backend = "cuda"', "default_backend"),
        (r"^vendor = .*$", 'vendor = "nvidia"\ncolour = "green"', "colour"),
    ],
)
def test_bad_file_names_file_and_key(tmp_path: Path, pattern: str, replacement: str, key: str) -> None:
    path = _copy_with(tmp_path, "nvidia-a100", pattern, replacement)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert f"'{key}'" in message
    assert path.name in message


def test_invalid_toml_is_a_profile_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("name = \n")
    with pytest.raises(ProfileError, match=r"broken\.toml"):
        load_profile(path)


def test_load_host_uses_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    sentinel = load_profile("intel-xeon-spr")
    monkeypatch.setattr(probe_module, "probe_host", lambda: sentinel)
    assert load_profile("host") is sentinel


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Profile, Path]:
    """Measure the host once for the module, caching in a fresh folder."""
    cache_dir = tmp_path_factory.mktemp("probe") / "cache"
    return probe_host(cache_dir=cache_dir), cache_dir


def test_probe_measures_plausible_figures(probed: tuple[Profile, Path]) -> None:
    profile, _ = probed
    assert profile.name == "host" and profile.kind == "cpu"
    assert profile.peak("fp32") > 1e9
    if "bf16" in profile.precisions:  # measured only where the CPU has BF16 arithmetic
        assert profile.peak("bf16") > 1e9
    else:
        assert "bf16" not in profile.peak_flops
    assert profile.memory_bandwidth > 1e9
    assert profile.memory_size > 2**28
    assert profile.threads == profile.cores == len(os.sched_getaffinity(0))
    assert {"fp32", "int8"} <= set(profile.precisions)
    assert profile.default_backend == "auto" and {"onnxruntime", "openvino"} <= set(profile.backends)


def test_probe_cache_is_private_and_reused(probed: tuple[Profile, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    profile, cache_dir = probed
    assert cache_dir.stat().st_mode & 0o777 == 0o700
    assert len(list(cache_dir.glob("host-*.json"))) == 1
    assert not list(cache_dir.glob(".host-*"))

    def must_not_measure(threads: int, bf16: bool = True, fp16: bool = False) -> dict[str, object]:
        raise AssertionError("the cached profile should have been used")

    monkeypatch.setattr(probe_module, "_measure", must_not_measure)
    again = probe_host(cache_dir=cache_dir)
    assert again == profile and again.digest() == profile.digest()


def test_probe_force_measures_again(probed: tuple[Profile, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _, cache_dir = probed
    monkeypatch.setattr(probe_module, "_measure", lambda threads, bf16=True, fp16=False: FIGURES)
    forced = probe_host(force=True, cache_dir=cache_dir)
    assert forced.peak("fp32") == 2e9 and forced.memory_bandwidth == 4e9
    assert probe_host(cache_dir=cache_dir) == forced


def test_probe_ignores_a_corrupt_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe_module, "_measure", lambda threads, bf16=True, fp16=False: FIGURES)
    first = probe_host(cache_dir=tmp_path)
    (cache_file,) = tmp_path.glob("host-*.json")
    cache_file.write_text("{not json")
    again = probe_host(cache_dir=tmp_path)
    assert again.peak_flops == first.peak_flops and again.memory_bandwidth == 4e9


def test_default_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ADAPTER_CACHE_DIR", str(tmp_path / "a"))
    assert probe_module.default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("ADAPTER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert probe_module.default_cache_dir() == tmp_path / "x" / "adapter"


def test_probe_keeps_only_the_flags_cpuid_confirms() -> None:
    flags = {"sse2", "avx2", "fma", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16"}
    everything = {name: True for name in probe_module._CPUID_NAMES.values()}
    assert probe_module._executable(flags, everything) == flags  # what CPUID cannot check stays while all agree
    no_bf16 = dict(everything, AVX512BF16=False)
    assert probe_module._executable(flags, no_bf16) == {"sse2", "avx2", "fma", "avx512f", "avx512_vnni"}
    avx2_only = dict(everything, AVX512F=False, AVX512VNNI=False, AVX512BF16=False)
    kept = probe_module._executable(flags, avx2_only)
    assert kept == {"sse2", "avx2", "fma"} and probe_module._precisions(kept) == ["fp32", "int8"]


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None or os.uname().machine != "x86_64",
                    reason="needs qemu-user's x86_64 emulator (tools/install-test-deps.sh installs qemu-user)")  # fmt: skip
def test_an_emulated_avx2_cpu_probes_as_fp32_int8() -> None:
    """Under qemu-user with a Haswell CPU model, /proc/cpuinfo still lists this host's flags
    (AVX-512, maybe AMX), while CPUID answers AVX2: the probe follows CPUID, as the engines do."""
    code = (
        "import json; from adapter.profiles.probe import _cpu_info, _precisions; f = set(_cpu_info()['flags']);"
        "print(json.dumps([sorted(x for x in f if x.startswith(('avx', 'amx'))), _precisions(f)]))"
    )
    python = os.path.realpath(sys.executable)
    done = subprocess.run(["qemu-x86_64", "-cpu", "Haswell-noTSX-IBRS", python, "-c", code],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    flags, precisions = json.loads(done.stdout.strip().splitlines()[-1])
    assert "avx2" in flags and not [f for f in flags if f.startswith(("avx512", "amx", "avx_vnni"))], flags
    assert precisions == ["fp32", "int8"]


def test_a_probe_under_an_address_space_limit_copies_less_and_caches_nothing(tmp_path: Path) -> None:
    """A process limited to 3 GiB (as ``adapter shard`` is in its test) probes without failing:
    its copy buffers fit in what the limit leaves, and the figure is not cached for others."""
    code = (
        "import resource, json, sys; from pathlib import Path; "
        "resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30)); "
        "from adapter.profiles import probe; probe._last_level_cache = lambda: 2**30; "  # 4x: 4 GiB wanted
        "p = probe.probe_host(force=True, cache_dir=Path(sys.argv[1])); "
        "print(json.dumps([p.memory_bandwidth, p.sources[1]]))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    bandwidth, source = json.loads(done.stdout.strip().splitlines()[-1])
    assert bandwidth > 1e9 and "address space is limited" in source, source
    assert not list(tmp_path.glob("host-*.json"))
