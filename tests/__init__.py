"""lucidlink's tests; run them with ``trial tests``."""

from hypothesis import HealthCheck, settings

# Shared CI machines are noisy: judge examples by their results, never their speed.
settings.register_profile("lucidlink", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("lucidlink")
