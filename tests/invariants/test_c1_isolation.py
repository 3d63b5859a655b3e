"""C1: a packed row gives the same logits and loss as its records run one by one, for every
attention implementation and isolation mechanism the trainer may pick on CPU (sfttrain/loss.py)."""

from __future__ import annotations

import pytest
import torch

from sfttrain.loss import AUTO_ISOLATION, LossModel, forward_kwargs, isolation_for
from sfttrain.model import CPU_ATTN_IMPLEMENTATIONS
from tests.sfttrain_helpers import packed_row, small_model

# (flex_attention, CUDA only, takes its document mask from position ids only: isolation_for
# refuses block_mask; the filter keeps that rule should it run here again)
CASES = [
    (impl, iso)
    for impl in CPU_ATTN_IMPLEMENTATIONS
    for iso in ("position_ids", "block_mask")
    if not (impl == "flex_attention" and iso == "block_mask")
]


@pytest.mark.parametrize(("impl", "isolation"), CASES)
@pytest.mark.parametrize("pad", [0, 7])
def test_packed_row_equals_separate_records(impl: str, isolation: str, pad: int) -> None:
    model = small_model(impl)
    lengths = [11, 5, 1, 16]
    records, ids, pos, labels = packed_row(lengths, pad)
    with torch.no_grad():
        packed = model(**forward_kwargs(ids, pos, isolation=isolation)).logits[0]
        start = 0
        for rec in records:
            alone = model(input_ids=rec[None], use_cache=False).logits[0]
            diff = (packed[start : start + len(rec)] - alone).abs().max().item()
            assert diff <= 1e-5, f"record at {start} leaks: {diff}"
            start += len(rec)
        # The loss the trainer computes (sum over trained tokens) equals the sum of separate losses.
        loss = LossModel(model, isolation=isolation)(ids, labels, pos)
        want = 0.0
        for rec in records:
            if len(rec) > 1:
                logits = model(input_ids=rec[None], use_cache=False).logits[0, :-1]
                want += torch.nn.functional.cross_entropy(logits, rec[1:], reduction="sum").item()
    assert abs(loss.item() - want) <= 1e-5 * max(1.0, abs(want))


@pytest.mark.parametrize("impl", CPU_ATTN_IMPLEMENTATIONS)
def test_auto_isolation_is_a_tested_mechanism(impl: str) -> None:
    assert isolation_for(impl) == AUTO_ISOLATION == "position_ids"
    assert isolation_for("sdpa", "block_mask") == "block_mask"


def test_flex_attention_is_refused_off_cuda() -> None:
    # its CPU kernel has no backward and let packed records see each other on an AVX2 CPU
    from sftdata.errors import ConfigError
    from sfttrain.model import check_attn_implementation, load_base_model

    with pytest.raises(ConfigError, match="flex_attention runs on a CUDA GPU only"):
        check_attn_implementation("flex_attention", cuda=False)
    check_attn_implementation("flex_attention", cuda=True)
    if not torch.cuda.is_available():  # eval and chat load models through here
        with pytest.raises(ConfigError, match="use sdpa"):
            load_base_model("tiny", attn_implementation="flex_attention")


def test_flex_attention_refuses_a_dense_mask() -> None:
    from sftdata.errors import ConfigError

    with pytest.raises(ConfigError, match="flex_attention"):
        isolation_for("flex_attention", "block_mask")


def test_selective_head_equals_full_logits_loss() -> None:
    model = small_model("sdpa")
    _, ids, pos, labels = packed_row([9, 12], 3)
    fast = LossModel(model, isolation="position_ids", selective_head=True)(ids, labels, pos)
    full = LossModel(model, isolation="position_ids", selective_head=False)(ids, labels, pos)
    assert torch.allclose(fast, full, atol=1e-5)
