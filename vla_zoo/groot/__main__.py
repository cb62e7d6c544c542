import sys

from vla_zoo.groot.cli import main

sys.exit(main())
