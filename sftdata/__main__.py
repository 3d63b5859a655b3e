"""``python -m sftdata``: the same CLI as the ``sftdata`` console script."""

from __future__ import annotations

from sftdata.cli import main

main()
