import sys

from refany3d.cli import main

sys.exit(main())
