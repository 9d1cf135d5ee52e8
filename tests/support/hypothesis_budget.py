"""Hypothesis budgets for the hostile-input tests (test_kernels, test_hostile,
test_threads).

Profiles (HYPOTHESIS_PROFILE, default "ci"):
  ci    bounded: the normal suite, and the sanitizer run, stay fast
  long  thousands of examples per property, for a soak before a release
The lead's tests/conftest.py registers the same two names; registering
again here is harmless and keeps these modules usable on their own.

`budget(n)` scales a test's own example count with the profile, so a
property that is expensive per example can ask for fewer than the default.
No deadline anywhere: timings are never asserted (and sanitizer builds are
several times slower).
"""
import os

from hypothesis import HealthCheck, settings

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large,
             HealthCheck.filter_too_much]
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
_SCALE = {"ci": 1, "long": 30}.get(PROFILE, 1)



def _registered(name):
    try:
        settings.get_profile(name)
        return True
    except Exception:  # noqa: BLE001 - InvalidArgument for an unknown name
        return False


for _name, _n in (("ci", 150), ("long", 5000)):
    if not _registered(_name):  # the lead's conftest may have made it already
        settings.register_profile(_name, max_examples=_n, deadline=None,
                                  suppress_health_check=_SUPPRESS)
settings.load_profile(PROFILE if _registered(PROFILE) else "ci")


def budget(n):
    """Settings for a property that wants about n examples in the ci profile."""
    return settings(max_examples=max(1, n * _SCALE), deadline=None,
                    suppress_health_check=_SUPPRESS, derandomize=_SCALE == 1 and
                    bool(os.environ.get("CI")))
