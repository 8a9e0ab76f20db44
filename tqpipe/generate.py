"""``tqpipe-generate``: chat with a packed tqpipe model from the command line.

    tqpipe-generate --model outputs/smollm2_135m_tq3a_tq2e_g32/publish \\
        --prompt "Why is the sky blue?" --max-tokens 256 --min-tokens 16 --temp 0.7 \\
        --top-p 0.95 --rep-penalty 1.04 --rep-ctx 256 --seed 0

Tokens stream as they are decoded; the chat template is used when the
tokenizer has one. The last lines give prompt and decode tokens/s and the
peak memory. ``--min-tokens N`` keeps end-of-sequence tokens from being
sampled for the first N tokens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import tqpipe  # noqa: F401  (fast BLAS before mlx)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="tqpipe-generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path, help="a packed model folder (pack or publish stage)")
    ap.add_argument("--prompt", required=True, help="the user message ('-' reads stdin)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--min-tokens", type=int, default=0, help="no end-of-sequence before this many tokens")
    ap.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--rep-penalty", type=float, default=None, help="repetition penalty, e.g. 1.04")
    ap.add_argument("--rep-ctx", type=int, default=20, help="tokens the repetition penalty looks back on")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    args = ap.parse_args(argv)
    if args.min_tokens < 0 or args.max_tokens < 1 or args.min_tokens > args.max_tokens:
        ap.error("need 0 <= --min-tokens <= --max-tokens and --max-tokens >= 1")
    if not (args.model / "config.json").exists():
        ap.error(f"--model {args.model}: no config.json there; point it at a pack or publish folder")
    return args


def min_tokens_processor(eos_ids: set[int], prompt_len: int, min_tokens: int):
    """A logits processor that forbids end-of-sequence tokens until ``min_tokens`` were generated."""
    import mlx.core as mx

    banned = mx.array(sorted(eos_ids), dtype=mx.uint32)

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size - prompt_len < min_tokens and banned.size:
            logits[..., banned] = -mx.inf
        return logits

    return process


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import mlx.core as mx
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    from tqpipe.runtime import load

    if args.seed is not None:
        mx.random.seed(args.seed)
    model, tok = load(args.model, dtype=mx.float32 if mx.default_device() == mx.cpu else None)
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if tok.chat_template and not args.no_chat_template:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    else:
        ids = tok.encode(text)
    processors = make_logits_processors(repetition_penalty=args.rep_penalty, repetition_context_size=args.rep_ctx)
    if args.min_tokens:
        processors.append(min_tokens_processor(set(tok.eos_token_ids), len(ids), args.min_tokens))
    last = None
    for last in stream_generate(model, tok, ids, max_tokens=args.max_tokens,
                                sampler=make_sampler(args.temp, top_p=args.top_p if args.top_p < 1 else 0.0),
                                logits_processors=processors):
        print(last.text, end="", flush=True)
    print()
    if last is not None:
        print(f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s | "
              f"decode: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s | "
              f"peak memory {last.peak_memory:.3f} GB", file=sys.stderr)


if __name__ == "__main__":
    main()
