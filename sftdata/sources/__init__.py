"""One adapter per raw input format."""
