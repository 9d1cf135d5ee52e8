"""Shared fixtures.

* `samples`: the shared sample streams (../shared/samples from the repository
  root, or $XLEGACY_SAMPLES); tests using it skip with a reason when the folder is absent.
* `impl`: parametrises a test over both kernel backends (native, reference).
* hypothesis profiles: HYPOTHESIS_PROFILE=ci (default, bounded) or =long.
* `vol_context()`: a Volatility 3 context whose layers (and their open
  files) are destroyed when the test ends.
"""
import json
import os
import pathlib

import pytest

from xlegacy.kernels import _reference

try:
    from xlegacy.kernels import _native
except ImportError:  # pragma: no cover - reference-only environment
    _native = None

ROOT = pathlib.Path(__file__).resolve().parent.parent
# XLEGACY_SAMPLES points a worktree that is not beside ../shared at the samples.
SAMPLES = pathlib.Path(os.environ.get("XLEGACY_SAMPLES") or ROOT.parent / "shared" / "samples")

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile("ci", max_examples=150, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("long", max_examples=5000, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover
    pass


def sample_names():
    if not SAMPLES.is_dir():
        return []
    return sorted(p.stem for p in SAMPLES.glob("*.json"))


def load_sample(name):
    meta = json.loads((SAMPLES / f"{name}.json").read_text())
    return SAMPLES / meta["file"], meta


@pytest.fixture
def samples():
    if not SAMPLES.is_dir():
        pytest.skip(f"shared samples not available ({SAMPLES} is missing)")
    return SAMPLES


@pytest.fixture(params=["native", "reference"])
def impl(request):
    if request.param == "native":
        if _native is None:
            pytest.skip("native backend not built")
        return _native
    return _reference


# Volatility's contexts never close their layers' files: the contexts tests
# make through vol_context() have their layers destroyed when the test ends.
_VOL_CONTEXTS = []


def vol_context():
    from volatility3.framework import contexts
    ctx = contexts.Context()
    _VOL_CONTEXTS.append(ctx)
    return ctx


@pytest.fixture(autouse=True)
def _destroy_vol_layers():
    yield
    while _VOL_CONTEXTS:
        ctx = _VOL_CONTEXTS.pop()
        for name in list(ctx.layers):
            ctx.layers[name].destroy()
