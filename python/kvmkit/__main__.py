import sys

from kvmkit.cli import main

sys.exit(main())
