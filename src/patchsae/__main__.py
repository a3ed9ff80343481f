import sys

from patchsae.cli import main

sys.exit(main())
