import sys

from mer_dist.cli import main

sys.exit(main())
