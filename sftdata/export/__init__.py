"""``sftdata export``: data for other training stacks.

- ``chat``: canonical conversations -> ShareGPT / Alpaca / OpenAI files (FastChat, LLaMA-Factory,
  OpenAI fine-tuning read them);
- ``mindrecord``: packed shards -> MindRecord for MindSpore Transformers.
"""
