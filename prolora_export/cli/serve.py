"""``prolora-export serve``: an OpenAI-compatible server for many adapters on one slot graph."""

from __future__ import annotations

import os

import click

from ..errors import PRoLoRAError
from .types import FINITE_FLOAT

KEY_VARIABLE = "PROLORA_API_KEY"


def parse_adapters(values: tuple[str, ...]) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise PRoLoRAError(f"--adapter wants NAME=PATH, got {value!r}")
        if name in adapters:
            raise PRoLoRAError(f"--adapter {name!r} is given twice")
        adapters[name] = path
    return adapters


@click.command("serve")
@click.argument("onnx_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH",
              help="Load an adapter (folder or .onnx_adapter) under the model name NAME; repeatable.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback exposes the server: set --api-key, put TLS in front.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--base-name", default=None, help="Model name of the base model. [default: ONNX_DIR's name]")
@click.option("--api-key", default=None, envvar=KEY_VARIABLE,
              help="Require 'Authorization: Bearer KEY' (also from $PROLORA_API_KEY).")
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(1), help="Rows decoded at once.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(0),
              help="Requests that may wait for a row; beyond, 429 with Retry-After.")
@click.option("--max-adapters", default=256, show_default=True, type=click.IntRange(0),
              help="Adapters loaded at once (each holds its shards in memory); a load beyond, 409.")
@click.option("--max-cached-tokens", default=32768, show_default=True, type=click.IntRange(1),
              help="Bound on rows × (prompt + max_tokens) in the KV cache. On a model builder graph the KV "
                   "pool, allocated at start: --max-batch rows of max-cached-tokens / max-batch tokens each.")
@click.option("--max-prefill-tokens", default=2048, show_default=True, type=click.IntRange(1),
              help="Prompt tokens prefilled per engine step: a long prompt is prefilled in chunks of this many, "
                   "between the running streams' tokens (no stream waits longer than one chunk).")
@click.option("--prefix-cache-tokens", default=4096, show_default=True, type=click.IntRange(0),
              help="Positions of prompt prefixes kept per adapter (model builder graphs): a repeated system "
                   "prompt or few-shot prefix is prefilled once per adapter. 0: no prefix cache.")
@click.option("--prefix-block", default=16, show_default=True, type=click.IntRange(1),
              help="Prefix-cache granularity: prompts are cached and matched in blocks of this many tokens.")
@click.option("--default-max-tokens", default=256, show_default=True, type=click.IntRange(1),
              help="max_tokens of a chat request that gives none (completions: 16, as OpenAI).")
@click.option("--threads", default=None, type=click.IntRange(1), help="ONNX Runtime intra-op threads.")
@click.option("--provider", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--shutdown-timeout", default=10.0, show_default=True, type=FINITE_FLOAT,
              help="Seconds in-flight requests may finish after SIGTERM before they are cancelled.")
@click.option("--max-body-bytes", default=1 << 20, show_default=True, type=click.IntRange(1),
              help="Largest request body; beyond, 413.")
@click.option("--body-timeout", default=30.0, show_default=True, type=FINITE_FLOAT,
              help="Seconds a request body may take to arrive; beyond, 408.")
@click.option("--timeout-keep-alive", default=5.0, show_default=True, type=FINITE_FLOAT,
              help="Seconds a connection may take to send a request's headers, or stay idle between requests.")
@click.option("--max-connections", default=None, type=click.IntRange(1),
              help="Open connections at most; beyond, 503. [default: max-batch + max-queue + 64]")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def command(onnx_dir: str, adapters: tuple[str, ...], **options) -> None:
    """Serve ONNX_DIR (an `onnx --mode compact --slots` export) with the OpenAI API.

    The request's `model` picks the adapter (or the base); requests for different adapters share
    batches. Endpoints: /v1/models, /v1/completions, /v1/chat/completions (stream: true for SSE),
    POST /v1/adapters {name, path}, DELETE /v1/adapters/NAME, /health, /metrics (Prometheus).
    """
    from ..serve import serve

    if options["api_key"] is None and os.environ.get(KEY_VARIABLE) == "":
        options["api_key"] = ""  # click skips an empty variable; serve refuses an empty key, as meant
    serve(onnx_dir, parse_adapters(adapters), **options)
