"""``python -m robustkern_cli ...`` (and ``torchrun --nproc_per_node N -m robustkern_cli train ...``)."""
import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
