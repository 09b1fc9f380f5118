"""``python -m trainer.commands COMMAND ...`` runs the ``shapeflow`` console script."""
import sys

from trainer.commands import main

sys.exit(main())
