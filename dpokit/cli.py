"""The `dpokit` command line: parses arguments, then calls one library function per command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import click
import typer
from rich.console import Console

from dpokit import __version__
from dpokit.errors import DpokitError

app = typer.Typer(
    help="Preference fine-tuning (DPO, RSO, IPO, SimPO) with a reference model that runs once.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
cache_app = typer.Typer(help="Inspect and verify reference caches (ref.h5).", no_args_is_help=True)
config_app = typer.Typer(help="List and show training configs.", no_args_is_help=True)
eject_app = typer.Typer(help="Copy the training recipe or a config out for customisation.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
app.add_typer(config_app, name="config")
app.add_typer(eject_app, name="eject")

err_console = Console(stderr=True)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dpokit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    _state["debug"] = debug


# ----------------------------------------------------------------------------------------------
# prepare


@app.command()
def prepare(
    data: str = typer.Argument(..., help="A .json/.jsonl/.csv/.parquet file or folder, or a dataset name for datasets.load_dataset."),
    model: str = typer.Option(..., "--model", "-m", help="Model directory or hub name whose tokenizer (and chat template) to use."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (the prepared/ format)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer, when it differs from --model."),
    format: str = typer.Option("auto", "--format", help="auto, plain, conversational or implicit."),
    column_map: Optional[str] = typer.Option(None, "--column-map", help="Rename columns, e.g. chosen=better,rejected=worse."),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="Add (or replace) a system turn."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help="A Jinja chat template (text or file) overriding the tokenizer's."),
    split: str = typer.Option("train", "--split", help="Split to load from a dataset name."),
    subset: Optional[str] = typer.Option(None, "--subset", help="Dataset configuration name for datasets.load_dataset."),
    max_length: int = typer.Option(1024, "--max-length", help="Max tokens of prompt+response."),
    max_prompt_length: int = typer.Option(512, "--max-prompt-length", help="Max prompt tokens."),
    overlength: str = typer.Option("truncate", "--overlength", help="truncate, drop or error for pairs over the limits."),
    eval_fraction: float = typer.Option(0.0, "--eval-fraction", help="Hold out this fraction of rows as the eval split."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="A separate source for the eval split."),
    seed: int = typer.Option(42, "--seed", help="Seed for the eval split."),
    num_proc: int = typer.Option(1, "--num-proc", help="Tokenization processes."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
) -> None:
    """Tokenize preference pairs into a prepared/ directory."""
    from dpokit.data.pipeline import PrepareOptions, run_prepare

    run_prepare(
        PrepareOptions(
            data=data, model=model, out=out, tokenizer=tokenizer, format=format, column_map=column_map,
            system_prompt=system_prompt, chat_template=chat_template, split=split, subset=subset,
            max_length=max_length, max_prompt_length=max_prompt_length, overlength=overlength,
            eval_fraction=eval_fraction, eval_data=eval_data, seed=seed, num_proc=num_proc, overwrite=overwrite,
        )
    )


# ----------------------------------------------------------------------------------------------
# main


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: run the app; `DpokitError` becomes one red line (a traceback with --debug)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        app(args=args, prog_name="dpokit", standalone_mode=False)
        return 0
    except DpokitError as exc:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 1
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        err_console.print("[red]aborted[/]")
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code


def entry() -> None:
    sys.exit(main())
