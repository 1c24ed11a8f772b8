"""The AVX2 (8-lane) instantiation of the native forward kernels, on an AVX-512 machine too.

The library is built with `-march=native`, so on an AVX-512 host (like CI's) the suite only runs
the 16-lane strip kernel; users on AVX2-only CPUs get the 8-lane one (`Lanes8`, 2 tile rows per
key load instead of 3). This builds the single-thread harness `ffi/bench/fwd_kernels.cc` for
AVX2+FMA only and checks that its strip and blocked kernels agree with the per-query kernel (the
one the shared backend tests check against dense attention) on maps that exercise the partial
strips, clamped borders, dilation, 1-D and 3-D tiles. It also builds the harness for this
machine (`-march=native`, as the library) under AddressSanitizer: no kernel reads or writes
outside its buffers.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

_FFI = Path(__file__).resolve().parents[1] / "ffi"


def _cpu_has(*flags: str) -> bool:
    """Whether /proc/cpuinfo lists these flags (False where it cannot be read)."""
    try:
        line = next(
            x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags")
        )
    except (OSError, StopIteration):
        return False
    return set(flags) <= set(line.split(":", 1)[1].split())


pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None or not _cpu_has("avx2", "fma"),
    reason="needs g++ and an AVX2+FMA CPU",
)

# B H L0 L1 L2 D K dilation: strips with a partial last strip (19 = 8 + 8 + 3 lanes), dilation
# with clamped windows, a 3-D map, a 1-D map (blocked kernel), head_dim not a multiple of 8.
_CASES = [
    (2, 2, 1, 20, 19, 16, 5, 1),
    (1, 2, 1, 12, 30, 8, 3, 2),
    (2, 1, 6, 7, 9, 16, 3, 1),
    (2, 2, 1, 1, 100, 16, 7, 1),
    (1, 1, 1, 9, 11, 12, 7, 1),
]


def _compile_harness(exe: Path, *flags: str) -> subprocess.CompletedProcess:
    """Builds ffi/bench/fwd_kernels.cc into `exe` with these compiler flags."""
    cmd = ["g++", *flags, "-std=c++17", "-I", str(_FFI / "csrc"),
           str(_FFI / "bench" / "fwd_kernels.cc"), "-o", str(exe)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True)


def _max_diffs(stdout: str) -> dict[str, str]:
    """The harness's max |difference| to the per-query kernel, per kernel it ran."""
    return dict(re.findall(r"^(\S+)\s+[\d.]+ ms.*max\|diff\| (\S+)$", stdout, re.M))


def _assert_agree(diffs: dict[str, str]) -> None:
    for name, diff in diffs.items():
        # Outputs are O(1) (softmax averages of unit normals): float32 rounding of different
        # summation orders is ~1e-6.
        assert float(diff) <= 2e-5, f"{name}: max |diff| {diff} to the per-query kernel"


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("avx2") / "fwd_kernels"
    built = _compile_harness(exe, "-O3", "-mavx2", "-mfma", "-mf16c")
    assert built.returncode == 0, built.stderr
    return exe


@pytest.mark.parametrize("case", _CASES, ids=lambda c: "x".join(map(str, c)))
def test_avx2_forward_kernels_match_per_query(harness, case):
    run = subprocess.run(
        [str(harness), *map(str, case), "1"], check=True, capture_output=True, text=True
    )
    diffs = _max_diffs(run.stdout)
    assert set(diffs) == {"per-query", "blocked", "strips"}, run.stdout
    _assert_agree(diffs)


# Under AddressSanitizer, with this machine's widest vectors (-march=native: the 16-lane AVX-512
# strips where the CPU has them, the build the library gets): every kernel's reads stay inside
# their buffers (an unmasked 16-lane bias load once read up to 28 bytes past the bias buffer on
# strips at map borders; results were right, the read was not). Cases: a 1-D map on strips, a
# NAT stage-3-like map, a whole-map window (the shared-window kernel), dilation with clamping.
_ASAN_CASES = [
    (2, 2, 1, 1, 64, 32, 7, 1),
    (1, 2, 1, 14, 14, 32, 7, 1),
    (2, 3, 1, 7, 7, 16, 7, 1),
    (1, 2, 1, 12, 30, 8, 3, 2),
]


@pytest.fixture(scope="module")
def asan_harness(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("asan") / "fwd_kernels"
    built = _compile_harness(
        exe, "-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer", "-march=native"
    )
    if built.returncode != 0 and "asan" in built.stderr.lower():
        pytest.skip(f"no AddressSanitizer runtime: {built.stderr[-300:]}")
    assert built.returncode == 0, built.stderr
    return exe


@pytest.mark.parametrize("case", _ASAN_CASES, ids=lambda c: "x".join(map(str, c)))
def test_forward_kernels_under_address_sanitizer(asan_harness, case):
    run = subprocess.run([str(asan_harness), *map(str, case), "1"], capture_output=True, text=True)
    assert run.returncode == 0 and "AddressSanitizer" not in run.stderr, run.stderr[-3000:]
    diffs = _max_diffs(run.stdout)
    assert {"per-query", "blocked", "strips"} <= set(diffs), run.stdout
    _assert_agree(diffs)
