"""`python -m xlegacy ...` is the `xlegacy` command."""
import sys

from .cli import main

sys.exit(main())
