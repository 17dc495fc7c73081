"""``python -m hidden_align``: the ``hidden-align`` command."""

from hidden_align.cli import main

raise SystemExit(main())
