"""Thin Ray actors hosting rtb_ray library objects (no math here)."""

import os

# Token authentication stays on. Ray turns it on for the local instances it starts, but a
# process that joins a cluster (`--address`, `rtb-ray status/scale`) must ask for it, and Ray
# reads the mode when it is imported: so here, before any actor module imports Ray. The token
# is ~/.ray/auth_token (or RAY_AUTH_TOKEN); export RAY_AUTH_MODE=disabled to join a cluster
# that runs without authentication.
os.environ.setdefault("RAY_AUTH_MODE", "token")
