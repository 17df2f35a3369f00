import sys

from kinret.data.check import main

sys.exit(main())
