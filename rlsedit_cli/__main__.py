"""`python -m rlsedit_cli` is the `rlsedit` command."""

from rlsedit_cli.cli import main

raise SystemExit(main())
