"""Create and fill the sample invoicing database (any SQLAlchemy URL).

python samples/generate.py --db sqlite:///demo.db --customers 1000 --invoices 5000
"""

import sys

from mailsync.tools.samples import main

if __name__ == "__main__":
    sys.exit(main())
