"""`xlegacy bench`: the measurement engine, inputs and groups (see groups.py)."""
from .groups import *  # noqa: F401,F403
from .groups import PRIME, DESCRIPTION, EPILOG, configure, run  # noqa: F401
