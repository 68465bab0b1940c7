"""``python -m optfm`` is the same as the ``optfm`` command."""

from optfm.cli import main

raise SystemExit(main())
