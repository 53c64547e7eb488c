"""Hypothesis profiles shared by the test suite and ``jaxnet verify``.

- ``ci``: derandomized (the same examples on every run, so CI is reproducible) and short, to keep
  ``make test`` within its budget.
- ``thorough``: random and long, for hunting before a release or after touching a kernel.

The profile is chosen with ``JAXNET_HYPOTHESIS_PROFILE=ci|thorough`` (default ``ci``) or, for
``jaxnet verify``, with ``--profile``.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILE_ENV = "JAXNET_HYPOTHESIS_PROFILE"
PROFILES = ("ci", "thorough")
DEFAULT_PROFILE = "ci"

# Examples run slowly (each new shape compiles), so Hypothesis's speed checks would only get in the way.
_COMMON = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])


def register_profiles() -> None:
    """Registers the "ci" and "thorough" profiles with Hypothesis (idempotent)."""
    settings.register_profile("ci", max_examples=20, derandomize=True, **_COMMON)
    settings.register_profile("thorough", max_examples=400, **_COMMON)


def profile_name(name: str | None = None) -> str:
    """``name`` if given, else ``$JAXNET_HYPOTHESIS_PROFILE``, else "ci"; raises on unknown names."""
    name = name or os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE
    if name not in PROFILES:
        raise ValueError(f"unknown hypothesis profile {name!r}; choose one of {PROFILES} ({PROFILE_ENV})")
    return name


def load_profile(name: str | None = None) -> str:
    """Registers the profiles and makes ``profile_name(name)`` Hypothesis's default; returns it."""
    register_profiles()
    name = profile_name(name)
    settings.load_profile(name)
    return name


def get_profile(name: str | None = None) -> settings:
    """The ``settings`` object of a profile, without changing Hypothesis's default."""
    register_profiles()
    return settings.get_profile(profile_name(name))
