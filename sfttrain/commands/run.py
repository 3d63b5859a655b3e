"""`sfttrain run`: fine-tune a model on a shard folder."""

from __future__ import annotations

import click


@click.command("run")
@click.argument("shards", type=click.Path(file_okay=False, path_type=str))
@click.option(
    "-o",
    "--output",
    "output_dir",
    default=None,
    help="Run folder (default: output_dir from the config).",
)
@click.option(
    "-c",
    "--config",
    "config_path",
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
    default=None,
    help="'tiny' (built-in) or a local Hugging Face model folder.",
)
@click.option(
    "--resume",
    default=None,
    metavar="auto|PATH",
    help="Continue from the newest complete checkpoint in the run folder, or from PATH.",
)
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
@click.option(
    "--help-config",
    is_flag=True,
    is_eager=True,
    expose_value=False,
    callback=lambda ctx, _p, v: _help_config(ctx, v),
    help="List every config key with its default and meaning, then exit.",
)
def command(
    shards: str,
    output_dir: str | None,
    config_path: str | None,
    overrides: tuple[str, ...],
    model_spec: str | None,
    resume: str | None,
    no_progress: bool,
    nproc: int | None,
) -> None:
    """Fine-tune MODEL on the packed shards in SHARDS (LoRA or full; resumable; SIGTERM-safe).

    Writes OUTPUT/metrics.jsonl, loss.png, checkpoints/step-N/ and final/. A SIGTERM or Ctrl-C
    finishes the current step, saves a checkpoint and exits 0; `--resume auto` continues exactly.
    """
    import dataclasses

    from sftdata.errors import ConfigError
    from sfttrain.config import load_config

    config = load_config(config_path, list(overrides))
    model_spec = model_spec or config.model_name_or_path
    output_dir = output_dir or config.output_dir
    if not model_spec:
        raise ConfigError(
            "--model: give 'tiny' or a local model folder (or model_name_or_path in the config)"
        )
    if not output_dir:
        raise ConfigError("-o/--output: give a run folder (or output_dir in the config)")
    config = dataclasses.replace(config, model_name_or_path=model_spec, output_dir=output_dir)

    from sfttrain.distributed import dist_from_env, under_torchrun

    if nproc is not None and nproc > 1 and not under_torchrun():
        raise SystemExit(_run_torchrun(nproc, config))
    from sfttrain.commands import quiet_libraries

    quiet_libraries()
    dist = dist_from_env(config)

    from sftdata.errors import CheckpointError
    from sfttrain.train import train

    try:
        result = train(
            config,
            shards=shards,
            output_dir=output_dir,
            model_spec=model_spec,
            resume=resume,
            progress=not no_progress,
            dist=dist,
        )
    except OSError as e:
        # Checkpoints handle their own failures (the previous one stays valid); this is any other
        # write in the run folder (metrics.jsonl, final/, loss.png) on a full or read-only disk.
        where = e.filename or output_dir
        raise CheckpointError(f"{where}: cannot write ({e.strerror or e})") from None
    finally:
        dist.close()
    if not dist.is_main:
        return  # rank 0 reports for the group
    for note in result.resume_notes:
        click.echo(note, err=True)
    loss = f"{result.last_loss:.4f}" if result.last_loss is not None else "n/a"
    if result.stopped:
        click.echo(
            f"stopped at step {result.step}/{result.total_steps}; checkpoint {result.checkpoint} (resume with --resume auto)"
        )
    else:
        click.echo(
            f"trained {result.step} steps, {result.trained_tokens:,} trained tokens, last loss {loss}; final weights in {result.final_dir}"
        )


def _run_torchrun(nproc: int, config) -> int:
    """Run torchrun (``sfttrain run`` with the same arguments on ``nproc`` ranks); its exit code.

    What can be refused before any process starts is refused here, in one line (a bad config
    already was; QLoRA/flash attention/Liger without CUDA now), rather than once per rank.
    torchrun runs in its own session and this process stays as its parent only to route
    SIGTERM/SIGINT to the WORKERS: they agree, save one checkpoint and exit 0, so torchrun exits
    0 too. (Signalled itself, torchrun forwards the signal but then re-raises it: a traceback
    and a failed exit even though the checkpoint was written; a terminal's Ctrl-C would reach it
    through the process group, hence the separate session.)
    """
    import signal
    import subprocess
    import sys

    from sfttrain.distributed import default_device, strip_nproc, torchrun_argv
    from sfttrain.perf import check_platform

    check_platform(config, default_device())
    argv = torchrun_argv(nproc, strip_nproc(_run_args(sys.argv)))
    sys.stdout.flush()
    sys.stderr.flush()
    proc = subprocess.Popen(argv, start_new_session=True)

    def forward(signum: int, _frame) -> None:
        _signal_workers(proc.pid, signum)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _signal_workers(agent: int, signum: int) -> None:
    """Send ``signum`` to torchrun's worker processes (its children); to torchrun if none is found."""
    import contextlib
    import os
    from pathlib import Path

    try:
        children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    except OSError:  # not Linux, or no /proc children list
        children = []
    for pid in [int(c) for c in children] or [agent]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


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

    from sfttrain.config import TrainConfig, field_docs

    docs = field_docs()
    for f in dataclasses.fields(TrainConfig):
        default = f.default
        click.echo(f"{f.name} (default {default!r}): {docs.get(f.name, '')}")
    ctx.exit(0)
