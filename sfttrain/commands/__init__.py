"""One click command per module, each exposing `command`; cli.py lists them."""

from __future__ import annotations


def quiet_libraries() -> None:
    """transformers/peft chatter (save progress bars, advisory warnings) would bury the progress bar."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
