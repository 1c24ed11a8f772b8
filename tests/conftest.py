"""Test configuration: CPU only, and per-backend parametrisation of the shared NA test base."""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite's programs are tiny and compiled once each: compile time dominates it, and most of
# XLA:CPU's compile time is LLVM optimisation: without it a band-path gradient compiles in
# 6-8 s instead of 14-16 s (measured at load 5);
# the HLO (fusion, layout, sharding: what the tests inspect) is unchanged. Subprocesses inherit
# the flag through the environment (they append their own flags to XLA_FLAGS, never replace it).
# Many tests compile the same program (e.g. the reference a backend is compared with, once per
# backend class): a persistent compilation cache shared by the xdist workers and subprocesses of
# this run compiles each once. It is removed when the run ends (pytest_sessionfinish below).
# (xdist workers are started after this file is loaded, so they inherit the variable.)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="natjax-test-cache-")
    os.environ["NATJAX_TEST_OWN_CACHE"] = "1"
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# XLA:CPU's older elemental emitters instead of its MLIR fusion emitters compile the suite's
# programs 2-3x faster (a Pallas interpret-mode gradient 4.1 s -> 1.2 s, a band-path golden
# gradient 9.1 s -> 4.1 s; load 4). They change CPU code generation and the CPU-specific HLO
# passes after SPMD partitioning (which fusions are formed, scatters expanded into loops): the
# tests inspect jaxprs, lowered modules and the partitioner's collectives, none of which change.
# XLA aborts the process on a flag it does not know, and a jaxlib may drop either flag: each is
# kept only if a child process with it runs a computation (probed once, by the controller; xdist
# workers and subprocesses inherit the result through XLA_FLAGS and the marker variable).
_SPEED_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def _xla_accepts(flags: str) -> bool:
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
    probe = "import jax.numpy as jnp; jnp.ones(2).sum().block_until_ready()"
    try:
        done = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


if not os.environ.get("NATJAX_TEST_XLA_FLAGS_PROBED"):
    os.environ["NATJAX_TEST_XLA_FLAGS_PROBED"] = "1"
    _wanted = [f for f in _SPEED_FLAGS if f.split("=")[0] not in os.environ.get("XLA_FLAGS", "")]
    if _wanted and not _xla_accepts(" ".join(_wanted)):
        _wanted = [f for f in _wanted if _xla_accepts(f)]  # only on failure: one probe per flag
    if _wanted:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " " + " ".join(_wanted)
        ).strip()


# The longest items (minutes each on 2 cores) start first, so that xdist's workers do not end the
# run with one of them alone: the 8-device sharding subprocess of every backend and the training
# runs. A module with module-scoped fixtures moves as a whole (they stay contiguous).
_FIRST_MODULES = ("test_train.py", "test_train_run.py")
# Modules run by one xdist worker as one unit: test_train.py's run fixtures (`reference_run`,
# `sgd_reference`, ~30 s each) are then built once, not once by each worker running a test that
# uses them. (pytest-xdist's `xdist_group` marks do nothing with pytest 9: xdist renames
# `item._nodeid`, which pytest 9 no longer reads.)
_ONE_WORKER_MODULES = ("tests/test_train.py",)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    def rank(item):
        if getattr(item, "originalname", None) == "test_sharding_on_8_devices":
            return 0
        return 1 if item.path.name in _FIRST_MODULES else 2

    items.sort(key=rank)  # stable: the collection order within each rank


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`-n` with the default `--dist load`: xdist's per-test load balancing, except that each of
    `_ONE_WORKER_MODULES` is one work unit (units with the most tests are handed out first)."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            module = nodeid.split("::", 1)[0]
            return module if module in _ONE_WORKER_MODULES else nodeid

    return Scheduling(config, log)


def pytest_generate_tests(metafunc):
    # `NABackendTests.test_matches_reference` sweeps the seeds the backend class asks for.
    if "seed" in metafunc.fixturenames and metafunc.cls is not None:
        seeds = getattr(metafunc.cls, "property_seeds", None)
        if seeds is not None:
            metafunc.parametrize("seed", list(seeds))
    # `NABackendTests.test_features_match_reference`: the class's `feature_seeds`.
    if "feature_seed" in metafunc.fixturenames and metafunc.cls is not None:
        seeds = getattr(metafunc.cls, "feature_seeds", None)
        if seeds is not None:
            metafunc.parametrize("feature_seed", list(seeds))


@pytest.fixture
def fresh_traces():
    """For tests that monkeypatch what a call traces into (a backend table, a dispatch rule):
    `na1d/2d/3d` trace once per shape and reuse the trace (`api._attend` is jitted), so jax's
    caches are cleared before the test and after it (its patched traces must not outlive it)."""
    import jax

    jax.clear_caches()
    yield
    jax.clear_caches()


def pytest_sessionfinish(session):
    # The controller (not an xdist worker) removes the run's compilation cache.
    if os.environ.get("NATJAX_TEST_OWN_CACHE") and not hasattr(session.config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
