"""``python -m retinanet_jax.cli``: the ``retinanet-jax`` command."""

import sys

from retinanet_jax.cli.main import console_main

sys.exit(console_main())
