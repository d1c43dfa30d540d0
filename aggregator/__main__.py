"""`python -m aggregator` is the `statsd-aggregator` command."""

import sys

from .cli import main

sys.exit(main())
