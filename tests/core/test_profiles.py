"""Hardware profiles: shipped, valid, and matched to the host."""

from __future__ import annotations

import platform

import pytest

from edgefleet.profiles import UnknownProfileError, all_profiles, host_profile, load_profile


def test_required_profiles_ship() -> None:
    assert {"x86_64-avx2", "x86_64-vnni", "aarch64", "armv7-tflite"} <= set(all_profiles())


def test_host_profile_matches_this_machine() -> None:
    if platform.machine() not in {p.arch for p in all_profiles().values()}:
        pytest.skip(f"no profile for {platform.machine()}")
    assert host_profile().arch == platform.machine()
    assert load_profile("host") == host_profile()


def test_vnni_profile_needs_vnni_flags() -> None:
    vnni = load_profile("x86_64-vnni")
    assert vnni.matches_host("x86_64", {"avx2", "avx512_vnni"})
    assert not vnni.matches_host("x86_64", {"avx2", "fma"})
    assert load_profile("x86_64-avx2").matches_host("x86_64", {"avx2"})
    assert not vnni.matches_host("aarch64", {"avx2", "avx512_vnni"})


def test_unknown_profile_refused() -> None:
    with pytest.raises(UnknownProfileError, match="x86_64-vnni"):
        load_profile("pdp-11")
