"""`python -m quantizer.cli` (and `torchrun -m quantizer.cli`): the `quantize` command."""
import sys

from . import main

sys.exit(main())
