"""Hypothesis settings for the fuzz suite.

The default profile ("ci") is derandomized and keeps no example database, so a CI run is
reproducible and writes nothing into the checkout (hypothesis's own caches go to the temp
directory); ``SGSERVE_HYPOTHESIS_PROFILE=explore`` draws fresh random examples (and more of them)
when hunting for new bugs.
"""
from __future__ import annotations

import os
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir

set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "sgserve-hypothesis"))
settings.register_profile("ci", database=None, deadline=None, derandomize=True, print_blob=True, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("explore", database=None, deadline=None, max_examples=2000,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("SGSERVE_HYPOTHESIS_PROFILE", "ci"))
