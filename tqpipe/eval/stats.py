"""Quality statistics of a quantized model's logits against the unquantized model's.

Per scored token: the KL divergence KL(P_base ‖ P_quant) in nats, both models'
negative log-likelihood and probability of the true next token, and whether
their top-1 tokens agree. ``summarize`` turns the per-token arrays into the
reported figures, the set llama.cpp's ``--kl-divergence`` prints: PPL of both
and their ratio, mean KLD ± its standard error, its quantiles, Δp (the change
in the true token's probability) mean and RMS, and top-1 agreement.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np


def token_stats(base_logits: mx.array, quant_logits: mx.array, targets: mx.array) -> dict[str, np.ndarray]:
    """Per-position statistics for ``[T, V]`` logits and ``[T]`` next-token targets."""
    lp = base_logits.astype(mx.float32) - mx.logsumexp(base_logits.astype(mx.float32), axis=-1, keepdims=True)
    lq = quant_logits.astype(mx.float32) - mx.logsumexp(quant_logits.astype(mx.float32), axis=-1, keepdims=True)
    kld = mx.sum(mx.exp(lp) * (lp - lq), axis=-1)
    t = targets[:, None]
    nll_p = -mx.take_along_axis(lp, t, axis=-1)[:, 0]
    nll_q = -mx.take_along_axis(lq, t, axis=-1)[:, 0]
    agree = mx.argmax(lp, axis=-1) == mx.argmax(lq, axis=-1)
    return {k: np.array(v) for k, v in
            {"kld": kld, "nll_base": nll_p, "nll_quant": nll_q, "top1_agree": agree,
             "p_base": mx.exp(-nll_p), "p_quant": mx.exp(-nll_q)}.items()}


def summarize(per_token: dict[str, np.ndarray]) -> dict[str, float]:
    kld = per_token["kld"].astype(np.float64)
    dp = per_token["p_quant"].astype(np.float64) - per_token["p_base"].astype(np.float64)
    n = kld.size
    ppl_q = math.exp(float(per_token["nll_quant"].mean()))
    ppl_b = math.exp(float(per_token["nll_base"].mean()))
    return {
        "tokens_scored": int(n),
        "ppl_quant": ppl_q,
        "ppl_base": ppl_b,
        "ppl_ratio": ppl_q / ppl_b,
        "kld_mean": float(kld.mean()),
        "kld_stderr": float(kld.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        "kld_median": float(np.median(kld)),
        "kld_p90": float(np.percentile(kld, 90)),
        "kld_p99": float(np.percentile(kld, 99)),
        "kld_p999": float(np.percentile(kld, 99.9)),
        "kld_max": float(kld.max()),
        "delta_p_mean": float(dp.mean()),
        "delta_p_rms": float(np.sqrt(np.mean(dp * dp))),
        "top1_agreement": float(per_token["top1_agree"].mean()),
    }
