"""Test configuration: CPU only, and per-backend parametrisation of the shared NA test base."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")


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
