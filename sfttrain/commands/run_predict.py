"""`sfttrain run`'s predict step (``do_predict``, LLaMA-Factory's ``do_predict`` +
``predict_with_generate``): which records, and the step alone (``do_train: false``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sftdata.errors import ConfigError


def check_one_process(config: Any, several: bool) -> None:
    """The predict step runs in one process: refused, with the way round, under several."""
    if config.do_predict and several:
        raise ConfigError(
            "do_predict: the predict step runs in one process; train with --nproc, then "
            "`sfttrain eval RUN --generate -o DIR` (or run do_predict without --nproc)"
        )


def predict_after(
    config: Any, predict_set: tuple[Path, str] | None, final_dir: Path | None, output_dir: str
) -> dict[str, Any] | None:
    """The predict step on a finished run's final weights (None: not asked, or stopped)."""
    if predict_set is None or final_dir is None:
        return None
    return _predict(config, str(final_dir), None, predict_set, output_dir)


def predict_set_of(
    config: Any, section: Any, shards: str | None, model_spec: str, *, prepare: Any
) -> tuple[str | Path, str]:
    """(shards, split) the predict step generates from: the section's predict inputs packed (LF's
    eval_dataset, packed by ``prepare(section, model_spec, what=)``), else the validation split;
    checked before any training."""
    from sftdata.recipe import predict_section
    from sfttrain.data import has_split

    own = predict_section(section, model_spec) if section is not None else None
    if own is not None:
        return prepare(own, model_spec, what="predict"), "train"
    if shards is not None:
        if has_split(shards, config.eval_split):
            return shards, config.eval_split
        if not config.do_train and has_split(shards, "train"):
            return shards, "train"
    raise ConfigError(
        "do_predict: no records to predict: give eval_dataset (LLaMA-Factory) or "
        "data.predict_inputs, or hold out a validation split (val_size, data.val_count)"
    )


def predict_alone(
    config: Any, section: Any, shards: str | None, model_spec: str, output_dir: str, *,
    prepare: Any,
) -> dict[str, Any]:  # fmt: skip
    """``do_train: false``: the predict step on the model (and adapter) as given."""
    predict_set = predict_set_of(config, section, shards, model_spec, prepare=prepare)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return _predict(config, model_spec, config.adapter_name_or_path, predict_set, output_dir)


def _predict(
    config: Any, model: str, adapter: str | None, predict_set: tuple[Path, str], output_dir: str
) -> dict[str, Any]:
    from sfttrain.predict import predict_step

    return predict_step(
        model, adapter=adapter, shards=predict_set[0], split=predict_set[1],
        output_dir=Path(output_dir), max_new_tokens=config.max_new_tokens,
        batch_size=config.per_device_eval_batch_size,
    )  # fmt: skip


def predict_line(r: dict[str, Any]) -> str:
    """The predict step's scores in one line."""
    return (
        f"predict: {r['predict_samples']:,} replies generated: BLEU-4 {r['predict_bleu-4']:.2f}, "
        f"ROUGE-1 {r['predict_rouge-1']:.2f}, ROUGE-2 {r['predict_rouge-2']:.2f}, ROUGE-L "
        f"{r['predict_rouge-l']:.2f} (generated_predictions.jsonl, predict_results.json)"
    )
