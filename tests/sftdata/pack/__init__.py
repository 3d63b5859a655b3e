"""Tests; the layout mirrors the packages (README "Architecture")."""
