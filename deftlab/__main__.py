import sys

from deftlab.cli import main

sys.exit(main())
