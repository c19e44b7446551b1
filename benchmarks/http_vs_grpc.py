"""Per-request overhead of the OpenAI-compatible HTTP path against gRPC, on one running server.

The same prompts (base model, greedy, short outputs) go over both transports, interleaved
(A B B A ...) so drift hits both alike; one client at a time; a warm-up round first. Prints a
markdown table of median latencies and the HTTP / gRPC ratio measured in this run:

* gRPC: `loramerge_client.Client.generate` (unary Generate);
* HTTP: the `openai` SDK's `completions.create` (JSON) and `chat.completions.create` against
  gRPC with the same chat messages.

    loramerge serve &    # or make serve
    .venv/bin/python benchmarks/http_vs_grpc.py [--grpc 127.0.0.1:50051]
        [--http http://127.0.0.1:8000/v1] [--rounds 20] [--tokens 4]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import openai

from loramerge_client import Client

PROMPTS = ("The capital of France is", "Once upon a time", "2 + 2 =", "The sky is")


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def median_ms(values: Sequence[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grpc", default="127.0.0.1:50051", help="gRPC target")
    parser.add_argument("--http", default="http://127.0.0.1:8000/v1", help="OpenAI base URL")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=4)
    args = parser.parse_args()

    grpc_client = Client(args.grpc, timeout=120)
    sdk = openai.OpenAI(base_url=args.http, api_key="unused", max_retries=0)
    model = sdk.models.list().data[0].id  # the base model comes first
    tokens = args.tokens

    def chat(prompt: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": prompt}]

    paths: dict[str, Callable[[str], object]] = {
        "gRPC Generate (prompt)": lambda p: grpc_client.generate(p, max_tokens=tokens),
        "HTTP /v1/completions": lambda p: sdk.completions.create(
            model=model, prompt=p, max_tokens=tokens, temperature=0
        ),
        "gRPC Generate (chat)": lambda p: grpc_client.generate(messages=chat(p), max_tokens=tokens),
        "HTTP /v1/chat/completions": lambda p: sdk.chat.completions.create(
            model=model,
            messages=chat(p),
            max_tokens=tokens,
            temperature=0,  # type: ignore[arg-type]
        ),
    }
    for prompt in PROMPTS:  # warm-up: connections, tokenizer, prefix cache
        for call in paths.values():
            call(prompt)
    samples: dict[str, list[float]] = {name: [] for name in paths}
    names = list(paths)
    for round_index in range(args.rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for prompt in PROMPTS:
            for name in order:
                samples[name].append(timed(lambda name=name, prompt=prompt: paths[name](prompt)))
    grpc_client.close()
    sdk.close()

    count = args.rounds * len(PROMPTS)
    print(f"{count} requests per path, {tokens} tokens each, base model, one client\n")
    print("| path | median ms | p90 ms |")
    print("|---|---|---|")
    for name, values in samples.items():
        p90 = statistics.quantiles(values, n=10)[-1] * 1000
        print(f"| {name} | {median_ms(values)} | {p90:.1f} |")
    for http, grpc in (("HTTP /v1/completions", "gRPC Generate (prompt)"),
                       ("HTTP /v1/chat/completions", "gRPC Generate (chat)")):  # fmt: skip
        ratio = statistics.median(samples[http]) / statistics.median(samples[grpc])
        extra = (statistics.median(samples[http]) - statistics.median(samples[grpc])) * 1000
        print(f"\n* {http} / {grpc}: **{ratio:.2f}×** ({extra:+.1f} ms per request)")


if __name__ == "__main__":
    main()
