"""``tqpipe-serve``: an OpenAI-compatible HTTP server for packed models: mlx-lm's own server.

    tqpipe-serve --model outputs/smollm2_135m_tq3a_tq2e_g32/publish --host 127.0.0.1 --port 8080
    curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'

Every option of ``mlx_lm.server`` applies. A packed folder carries a small
``tqpipe_model.py`` (mlx-lm's ``model_file`` hook) that builds the quantized
layers, so this only adds ``--trust-remote-code``; ``mlx_lm.server --model
<folder> --trust-remote-code`` is the same thing.
"""

from __future__ import annotations

import sys

import tqpipe  # noqa: F401  (fast BLAS before mlx)


def main(argv: list[str] | None = None) -> None:
    from mlx_lm.server import main as mlx_lm_server

    args = list(sys.argv[1:] if argv is None else argv)
    if "--trust-remote-code" not in args:
        args.append("--trust-remote-code")
    sys.argv = ["tqpipe-serve", *args]
    mlx_lm_server()


if __name__ == "__main__":
    main()
