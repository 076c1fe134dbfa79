"""Session-wide test settings."""

import os

# Kedro's telemetry would try the network on every CLI call; CI and users' tests must not.
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
