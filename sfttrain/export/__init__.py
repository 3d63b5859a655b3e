"""``sfttrain export``: a trained model for other tools.

- ``hf``: a checkpoint as a loadable Hugging Face folder (the adapter, or merged weights);
- ``gguf``: one GGUF file for llama.cpp (architectures, the tokenizer, quantisation).
"""
