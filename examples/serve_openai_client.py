"""Concurrent requests for several adapters to `prolora-export serve`, with the `openai` package.

Start a server first, for instance on the demo model with two adapters:

    prolora-export onnx --base smollm2-135m --adapter task-a --mode compact --slots --out slots/
    prolora-export serve slots/ --adapter a=task-a/ --adapter b=task-b/ --api-key secret

then run this (it asks every served model at once, streams one answer, and prints the metrics):

    python examples/serve_openai_client.py --url http://127.0.0.1:8000/v1 --api-key secret
"""

from __future__ import annotations

import argparse
import asyncio

import httpx
from openai import AsyncOpenAI

QUESTIONS = ["Name a river in Europe.", "What is bread made of?", "Give one chess opening.", "Why is the sky blue?"]


async def main(url: str, api_key: str, max_tokens: int) -> None:
    client = AsyncOpenAI(base_url=url, api_key=api_key)
    models = [m.id for m in (await client.models.list()).data]  # the base, then every loaded adapter
    print("models:", ", ".join(models))

    async def ask(model: str, question: str) -> str:
        reply = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
            temperature=0.7, seed=0)
        return f"[{model}] {question} -> {reply.choices[0].message.content!r} ({reply.usage.completion_tokens} tokens)"

    # every model × every question at once: the server batches rows of different adapters together
    for line in await asyncio.gather(*(ask(m, q) for m in models for q in QUESTIONS)):
        print(line)

    print(f"\nstreamed from {models[-1]}: ", end="", flush=True)
    stream = await client.chat.completions.create(
        model=models[-1], messages=[{"role": "user", "content": "Tell me a short story."}], max_tokens=max_tokens,
        stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()
    await client.close()

    metrics = httpx.get(url.rsplit("/v1", 1)[0] + "/metrics", headers={"Authorization": f"Bearer {api_key}"}).text
    print("\n" + "\n".join(line for line in metrics.splitlines() if line.startswith("prolora_") and "{" not in line))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none", help="the server's --api-key (any string when it has none)")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    asyncio.run(main(args.url, args.api_key, args.max_tokens))
