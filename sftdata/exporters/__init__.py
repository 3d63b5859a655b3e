"""Exporters of packed shards to other training stacks' binary formats (MindRecord)."""
