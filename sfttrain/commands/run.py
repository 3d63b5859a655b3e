"""`sfttrain run`: fine-tune a model on a shard folder, or on the data section of its config
(converted and packed first, cached)."""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from sftdata.errors import ConfigError
from sftdata.text import counted
from sfttrain.commands import unverified_option
from sfttrain.commands.run_predict import (
    check_one_process,
    predict_after,
    predict_alone,
    predict_line,
    predict_set_of,
)

PREPARED_SHARDS = "SFTPIPE_PREPARED_SHARDS"
"""Environment variable through which ``--nproc`` hands its ranks the shards it packed from the
config's data section (so they train on them instead of packing again)."""


@click.command("run")
@click.argument("shards", required=False, type=click.Path(file_okay=False, path_type=str))
@click.option(
    "-o",
    "--output",
    "output_dir",
    metavar="PATH",
    default=None,
    help="Run folder (default: output_dir from the config).",
)
@click.option(
    "-c",
    "--config",
    "config_path",
    metavar="PATH",
    default=None,
    help="YAML config (HF TrainingArguments / LLaMA-Factory key names).",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override one config key (repeatable).",
)
@click.option(
    "--model",
    "model_spec",
    metavar="PATH",
    default=None,
    help="'tiny' (built-in) or a local Hugging Face model folder.",
)
@click.option(
    "--resume",
    default=None,
    metavar="auto|PATH",
    help="Continue from the newest complete checkpoint in the run folder, or from PATH.",
)
@unverified_option
@click.option(
    "--no-progress", is_flag=True, help="No progress bar (metrics.jsonl is still written)."
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=None,
    help="Train on N processes of this node: runs `torchrun --standalone --nproc_per_node N "
    "-m sfttrain run ...` with the other arguments (multi-node: call torchrun yourself).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option(
    "--help-config",
    is_flag=True,
    is_eager=True,
    expose_value=False,
    callback=lambda ctx, _p, v: _help_config(ctx, v),
    help="List every config key with its default and meaning, then exit.",
)
def command(
    shards: str | None,
    output_dir: str | None,
    config_path: str | None,
    overrides: tuple[str, ...],
    model_spec: str | None,
    resume: str | None,
    allow_unverified: bool,
    no_progress: bool,
    nproc: int | None,
    as_json: bool,
) -> None:
    """Fine-tune MODEL on the packed shards in SHARDS, or on the config's data section
    (LoRA or full; resumable; SIGTERM-safe).

    Writes OUTPUT/metrics.jsonl, loss.png, checkpoints/step-N/ and final/ (its files also linked
    from OUTPUT). A SIGTERM or Ctrl-C finishes the current step, saves a checkpoint and exits 0;
    `--resume auto` continues exactly. Without SHARDS the config's `data:` section (or a
    LLaMA-Factory YAML's dataset/template/cutoff_len...) is converted and packed first, into a
    cache a second run reuses.

    \b
    Examples:
      sfttrain run shards/ --model tiny -o out/
      sfttrain run -c qwen_lora_sft.yaml --set model_name_or_path=/models/qwen2.5-0.5b
      sfttrain run shards/ -c train.yaml --nproc 2 --resume auto
    """
    config, data = _config(config_path, overrides, model_spec=model_spec, output_dir=output_dir)
    model_spec, output_dir = config.model_name_or_path, config.output_dir
    prepared_here = os.environ.get(PREPARED_SHARDS)  # set by `--nproc` for its ranks
    if prepared_here and shards is None:
        shards, data = prepared_here, None
    section = _data_section(data, shards, config_path)

    from sfttrain.distributed import dist_from_env, under_torchrun

    launching = nproc is not None and nproc > 1 and not under_torchrun()
    check_one_process(config, launching or under_torchrun())
    if not config.do_train:  # LLaMA-Factory's predict step alone
        from sfttrain.commands import quiet_libraries

        quiet_libraries()
        results = predict_alone(config, section, shards, model_spec, output_dir, prepare=_prepare)
        click.echo(json.dumps({"predict": results}) if as_json else predict_line(results))
        return
    if launching or not under_torchrun():
        shards = _shards_folder(section, shards, model_spec)  # once, before any rank starts
    predict_set = (
        predict_set_of(config, section, shards, model_spec, prepare=_prepare)
        if config.do_predict
        else None
    )
    if launching:
        raise SystemExit(_run_torchrun(nproc, config, shards=shards if section else None))
    from sfttrain.commands import quiet_libraries

    quiet_libraries()
    dist = dist_from_env(config)
    if under_torchrun():
        shards = _shards_folder(section, shards, model_spec, dist=dist)
    assert shards is not None
    result = _train(config, shards, output_dir, model_spec, resume=resume,
                    allow_unverified=allow_unverified, no_progress=no_progress, dist=dist)  # fmt: skip
    predicted = predict_after(config, predict_set, result.final_dir, output_dir)
    if dist.is_main:  # rank 0 reports for the group
        _echo_result(result, as_json=as_json, predicted=predicted)


def _shards_folder(
    section: Any, shards: str | None, model_spec: str, *, dist: Any = None
) -> str | None:
    """The shard folder the run trains on: SHARDS as given; else the data section packed, here
    (one process, or before ``--nproc`` starts its ranks) or, under a torchrun the user started
    (``dist``), by rank 0 while the others wait, every rank then naming the same folder."""
    if section is None:
        return shards
    if dist is None:
        return str(_prepare(section, model_spec))
    if dist.is_main:
        _prepare(section, model_spec)
    dist.barrier()
    from sftdata.recipe import work_dir

    return str(work_dir(section, model_spec) / "shards")


def _train(
    config: Any, shards: str, output_dir: str, model_spec: str, *, resume: str | None,
    allow_unverified: bool, no_progress: bool, dist: Any,
) -> Any:  # fmt: skip
    """``sfttrain.train.train`` with this command's log lines; a failed write is one line."""
    from sftdata.errors import OutputError
    from sfttrain.train import train

    lines = _LogLines() if not no_progress and not sys.stderr.isatty() else None
    try:
        return train(
            config, shards=shards, output_dir=output_dir, model_spec=model_spec, resume=resume,
            allow_unverified=allow_unverified, progress=not no_progress and lines is None,
            dist=dist, on_log=lines or _eval_lines, on_event=_event_lines,
        )  # fmt: skip
    except OSError as e:
        # Checkpoints handle their own failures (the previous one stays valid); this is any other
        # write in the run folder (metrics.jsonl, final/, loss.png) on a full or read-only disk.
        where = e.filename or output_dir
        raise OutputError(f"{where}: cannot write ({e.strerror or e})") from None
    finally:
        dist.close()


def _config(
    config_path: str | None, overrides: tuple[str, ...], *, model_spec: str | None,
    output_dir: str | None,
) -> tuple[Any, Any]:  # fmt: skip
    """The run's config with --model/-o applied (both required somewhere), and its data section."""
    import dataclasses

    from sfttrain.config_file import load_run_config

    config, data = load_run_config(config_path, list(overrides))
    model_spec_given = model_spec is not None
    model_spec = model_spec or config.model_name_or_path
    output_dir = output_dir or config.output_dir
    if not model_spec:
        raise ConfigError(
            "--model: give 'tiny' or a local model folder (or model_name_or_path in the config)"
        )
    if not output_dir:
        raise ConfigError("-o/--output: give a run folder (or output_dir in the config)")
    if model_spec != "tiny" and not Path(model_spec).expanduser().exists():
        key = "--model" if model_spec_given else "model_name_or_path"
        raise ConfigError(
            f"{key}: {model_spec} does not exist; it must be a local model folder (sftpipe never "
            "downloads: point it at a downloaded copy, or give 'tiny')"
        )
    return dataclasses.replace(config, model_name_or_path=model_spec, output_dir=output_dir), data


def _event_lines(event: Any) -> None:
    """The run's start, resume point, checkpoints and a stop request, on stderr as they happen
    (a terminal and a log alike)."""
    from sfttrain.events import lines

    for line in lines(event):
        click.echo(line, err=True)


def _echo_result(result: Any, *, as_json: bool, predicted: dict[str, Any] | None = None) -> None:
    if as_json:
        import json

        keys = ("step", "total_steps", "stopped", "last_loss", "trained_tokens")
        d = {k: getattr(result, k) for k in keys}
        d |= {"checkpoint": str(result.checkpoint) if result.checkpoint else None,
              "final": str(result.final_dir) if result.final_dir else None}  # fmt: skip
        if predicted is not None:
            d["predict"] = predicted
        click.echo(json.dumps(d))
        return
    loss = f"{result.last_loss:.4f}" if result.last_loss is not None else "n/a"
    if result.stopped:
        click.echo(
            f"stopped at step {result.step}/{result.total_steps}; checkpoint {result.checkpoint} "
            "(resume with --resume auto)"
        )
    else:
        click.echo(
            f"trained {counted(result.step, 'step')}, {result.trained_tokens:,} trained tokens, last loss "
            f"{loss}; final weights in {result.final_dir}"
        )
    if predicted is not None:
        click.echo(predict_line(predicted))


def _data_section(data: Any, shards: str | None, config_path: str | None) -> Any:
    """The config's data section, parsed (errors name the file and key), when it is used."""

    if data is None:
        if shards is None:
            raise click.UsageError("give SHARDS, or a config (-c) with a data: section")
        return None
    if shards is not None:  # the two-step path: shards packed beforehand win
        click.echo(
            f"note: {config_path}: its data section (or LLaMA-Factory data keys) is not used: "
            f"training on {shards}",
            err=True,
        )
        return None
    from sftdata.recipe import parse_data_section

    try:
        return parse_data_section(data)
    except ConfigError as e:
        raise ConfigError(f"{config_path}: {e}") from None


def _prepare(section: Any, model_spec: str, *, what: str = "data") -> Any:
    """Convert and pack the data section (a no-op when the cache is current); say what it did
    (on stderr: stdout is the run's result)."""
    from sftdata.recipe import prepare

    prepared = prepare(section, model_spec=model_spec, log=lambda m: click.echo(m, err=True))
    for inp, conv, taken in zip(section.inputs, prepared.converted, prepared.mixed, strict=True):
        click.echo(
            f"{what}: {inp.path or inp.dataset}: {counted(conv.records_out, 'record')}, "
            f"{taken:,} into the mix",
            err=True,
        )
    if prepared.repacked:
        click.echo(
            f"{what}: the data or options changed since {prepared.shards} was packed: repacked",
            err=True,
        )
    report = prepared.pack
    for line in report.summary_lines():
        click.echo(f"{what}: {line.strip()}", err=True)
    for line in report.warnings():
        click.echo(line, err=True)
    return prepared.shards


class _LogLines:
    """Without a terminal (a log file, a cluster job, CI): one plain, complete line per logging
    step and per evaluation on stderr, flushed, instead of a progress bar."""

    def __init__(self) -> None:
        import time

        self._clock = time.perf_counter
        self._start: tuple[float, int] | None = None

    def __call__(self, row: dict[str, Any], total_steps: int) -> None:
        step = row["step"]
        if "eval_loss" in row:
            _eval_lines(row, total_steps)
            return
        now = self._clock()
        if self._start is None:
            self._start = (now, step)
        t0, s0 = self._start
        eta = "-"
        if step > s0:
            left = (now - t0) / (step - s0) * (total_steps - step)
            eta = str(datetime.timedelta(seconds=int(left)))
        mfu = f", MFU {100 * row['mfu']:.1f}%" if row.get("mfu") is not None else ""
        click.echo(
            f"step {step}/{total_steps}: loss {row['loss']:.4f}, lr {row['lr']:.2e}, "
            f"{row['tokens_per_s']:,.0f} trained tokens/s{mfu}, ETA {eta}",
            err=True,
        )


def _eval_lines(row: dict[str, Any], total_steps: int) -> None:
    """Evaluation results reach the console (in a terminal, above the progress bar)."""
    if "eval_loss" in row:
        scores = ""
        if "eval_bleu-4" in row:  # eval_generate: the generation metrics too
            scores = ", " + ", ".join(
                f"{name} {row[f'eval_{key}']:.2f}"
                for name, key in (("BLEU-4", "bleu-4"), ("ROUGE-1", "rouge-1"),
                                  ("ROUGE-2", "rouge-2"), ("ROUGE-L", "rouge-l"))
            )  # fmt: skip
        click.echo(
            f"eval at step {row['step']}/{total_steps}: loss {row['eval_loss']:.4f}, "
            f"perplexity {row['eval_perplexity']:.2f} over {row['eval_tokens']:,} trained "
            f"tokens{scores}",
            err=True,
        )


def _run_torchrun(nproc: int, config, *, shards: str | None = None) -> int:
    """Run torchrun (``sfttrain run`` with the same arguments on ``nproc`` ranks); its exit code.

    What can be refused before any process starts is refused here, in one line (a bad config
    already was; QLoRA/flash attention/Liger without CUDA now), rather than once per rank.
    """
    from sfttrain.distributed import default_device, run_torchrun, strip_nproc, torchrun_argv
    from sfttrain.perf import check_platform

    check_platform(config, default_device())
    argv = torchrun_argv(nproc, strip_nproc(_run_args(sys.argv)))
    sys.stdout.flush()
    sys.stderr.flush()
    return run_torchrun(argv, env={**os.environ, PREPARED_SHARDS: shards} if shards else None)


def _run_args(argv: list[str]) -> list[str]:
    """The arguments after the ``run`` command word of this process's command line."""
    try:
        return argv[argv.index("run") + 1 :]
    except ValueError:
        return argv[1:]


def _help_config(ctx: click.Context, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    import dataclasses

    from sftdata.recipe import DataInput, section_help
    from sftdata.text import field_docs as data_docs
    from sfttrain.config import TrainConfig, field_docs

    docs = field_docs()
    for f in dataclasses.fields(TrainConfig):
        default = f.default
        click.echo(f"{f.name} (default {default!r}): {docs.get(f.name, '')}")
    # the data: section (converted and packed before training) and the keys of each input
    click.echo("\ndata: (a mapping; sftdata convert and pack options, then the run trains on it)")
    for key, default, doc in section_help():
        shown = "required" if default is dataclasses.MISSING else f"default {default!r}"
        click.echo(f"  {key} ({shown}): {doc}")
    click.echo("data.inputs[] / data.predict_inputs[] (a path, or a mapping):")
    docs = data_docs(DataInput)
    for f in dataclasses.fields(DataInput):
        name = "from" if f.name == "fmt" else f.name  # the YAML key (a Python keyword here)
        click.echo(f"  {name} (default {f.default!r}): {docs.get(f.name, '')}")
    ctx.exit(0)
