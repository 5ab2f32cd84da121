"""``python -m sft judge FILE``: score answers with a judge model (Ollama, or OpenAI-compatible)."""
import sys
from pathlib import Path

from ..judge import (DEFAULT_TIMEOUT, OLLAMA_URL, OPENAI_URL, JudgeError, default_scores_path, judge_prompts,
                     load_entries, make_client, score_responses)
from ..judge.stats import summarize_scores


def add_arguments(parser):
    """Arguments of the `judge` subcommand."""
    parser.add_argument("input", help="JSON array (or JSONL) of entries with instruction, input, output "
                                      "and the response to score")
    parser.add_argument("--key", default="model_response", help="entry field holding the response to score")
    parser.add_argument("--model", default="llama3", help="judge model, as the server names it")
    parser.add_argument("--backend", choices=("ollama", "openai"), default="ollama",
                        help="the server's API: Ollama's /api/chat, or an OpenAI-compatible /v1/chat/completions "
                             "(llama.cpp server, vLLM, hosted APIs)")
    parser.add_argument("--url", default=None, help=f"server URL (default: {OLLAMA_URL} for ollama, "
                                                    f"{OPENAI_URL} for openai)")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY",
                        help="environment variable holding the key for --backend openai")
    parser.add_argument("--out", default=None, help="scores file (JSONL), resumed if it exists "
                                                    "(default: <input>.<key>.scores.jsonl)")
    parser.add_argument("--concurrency", type=int, default=1, help="questions in flight at once")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT[1], help="seconds to wait for a reply")
    parser.add_argument("--retries", type=int, default=3, help="retries on connection errors and HTTP 5xx")
    parser.add_argument("--retry-unparsed", action="store_true",
                        help="ask again the items whose stored reply held no score 0..100")
    return parser


def run(args):
    """Run the `judge` subcommand; -> exit status (0 ok, 1 judge failed, 2 bad input)."""
    from tqdm import tqdm

    try:
        entries = load_entries(args.input)
        judge_prompts(entries, args.key)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    extra = {"api_key_env": args.api_key_env} if args.backend == "openai" else {}
    client = make_client(args.backend, args.model, args.url, timeout=args.timeout, retries=args.retries, **extra)
    status = client.status()
    if not status.reachable:
        print(f"error: {status.error}", file=sys.stderr)
        return 1
    if not status.has_model(args.model):
        hint = f"run `ollama pull {args.model}`" if args.backend == "ollama" else "pick one the server lists"
        print(f"warning: {status.url} lists no model '{args.model}' ({hint}); trying anyway", file=sys.stderr)
    out = Path(args.out) if args.out else default_scores_path(args.input, args.key)
    print(f"Judge: {client.name}\nScores file: {out}")
    with tqdm(total=len(entries), desc="Scoring entries") as bar:
        try:
            records = score_responses(entries, args.key, client=client, store=out, concurrency=args.concurrency,
                                      retry_unparsed=args.retry_unparsed,
                                      progress=lambda done, total: bar.update(done - bar.n))
        except (JudgeError, ValueError) as exc:
            bar.close()
            print(f"error: {exc}", *getattr(exc, "__notes__", ()), sep="\n", file=sys.stderr)
            return 1
    s = summarize_scores([r["score"] for r in records])
    print(f"Number of scores: {s['n']} of {s['total']}")
    if s["n"]:
        print(f"Average score: {s['mean']:.2f} (median {s['median']:g}, "
              f"95% bootstrap interval {s['ci_low']:.2f} to {s['ci_high']:.2f})")
    if s["unparsed"]:
        print(f"Unparsed replies: {s['unparsed']} (kept with their raw text in {out})")
    edges, counts = s["histogram"]["edges"], s["histogram"]["counts"]
    scale = 40 / max(max(counts), 40)  # bars at most 40 characters wide
    for lo, hi, c in zip(edges, edges[1:], counts):
        print(f"{lo:4.0f}-{hi:<4.0f}{'#' * round(c * scale)} {c}")
    return 0
