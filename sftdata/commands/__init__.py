"""One click command per module, each exposing `command`; cli.py lists them."""
