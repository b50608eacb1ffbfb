"""Document masking on CUDA (compiled FlexAttention with a BlockMask): right numbers, and its speed, PASS/FAIL.

    python -m bench.gpu_flex                 # on a CUDA machine; exit 1 if a check fails
    python -m bench.gpu_flex --smoke         # anywhere: tiny sizes on the CPU, checks the script runs (no verdict)

1. Numbers: GPT-2-small shape (d_model 768, 12 layers, 12 heads, d_ff 2048, vocab 50257), B=8 windows of T=2048
   with an end-of-text at rate 1/256 (several documents a row), bf16 autocast as the trainer runs. For every
   document, the masked model's logits over the whole batch (FlexAttention, doc ids -> BlockMask) are compared
   with that document run alone through the unmasked model (SDPA ``is_causal``, positions from 0) in float32,
   the exact answer; bf16 makes neither exact, so the tolerance is stated against bf16 itself: the masked bf16
   error must be at most ``masked_err_vs_bf16_alone_err`` times the error of the same document run alone in bf16
   (plus a floor for documents where that is 0 or tiny), at the max and the mean over elements. The unmasked
   model's logits must differ from the per-document ones by far more than that error (else the check is void).
2. Speed at the same shape, bf16, the masked path against unmasked SDPA (``is_causal``), in interleaved rounds
   (median of per-round time ratios, CUDA-synchronised): attention alone (q, k, v (8, 12, 2048, 64); the masked
   BlockMask built once beforehand, its build timed apart) forward and forward + backward, and the whole model's
   forward + backward (the masked one builds its BlockMask from doc ids in every forward, as training does).

Checks (THRESHOLDS): the numbers above; and the masked whole-model step at least ``masked_model_throughput``
of the unmasked one (a FlexAttention left uncompiled, which materialises every score, is far below it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from bench.gpu_check import report
from lmtrain import TransformerLM, doc_ids
from lmtrain.documents import document_attention, flex_attend

THRESHOLDS = {
    "masked_err_vs_bf16_alone_err": 2.0,  # at most, max and mean error over every document's logits
    "err_floor": 1e-2,  # absolute, added to the allowed max error (bf16's step at logits of order 1)
    "unmasked_diff_vs_masked_err": 5.0,  # at least: the unmasked model is measurably not the per-document one
    "masked_model_throughput": 0.75,  # at least, of unmasked SDPA, whole model forward + backward
}
EOT = 0


def shape(smoke: bool) -> dict:
    if smoke:
        return {"B": 2, "T": 64, "eot_rate": 1 / 16, "d_model": 64, "num_layers": 2, "num_heads": 2, "d_ff": 128,
                "vocab_size": 512}  # fmt: skip
    return {"B": 8, "T": 2048, "eot_rate": 1 / 256, "d_model": 768, "num_layers": 12, "num_heads": 12, "d_ff": 2048,
            "vocab_size": 50257}  # fmt: skip


def make_model(s: dict, device: torch.device) -> TransformerLM:
    torch.manual_seed(0)
    keys = ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff")
    return TransformerLM(context_length=s["T"], **{k: s[k] for k in keys}).to(device)


def windows(s: dict, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, s["vocab_size"], (s["B"], s["T"]), generator=g)
    return x.masked_fill(torch.rand(s["B"], s["T"], generator=g) < s["eot_rate"], EOT).to(device)


def autocast(device: torch.device, smoke: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=not smoke)


@torch.no_grad()
def numbers(model: TransformerLM, x: torch.Tensor, smoke: bool) -> dict:
    """Errors of the masked logits against each document alone in float32, next to bf16's own error."""
    device, ids = x.device, doc_ids(x, EOT)
    with autocast(device, smoke):
        masked = model(x, doc_ids=ids).float()  # (B, T, V)
        unmasked = model(x).float()
    worst = {"masked_max": 0.0, "alone_bf16_max": 0.0, "unmasked_max": 0.0}
    sums = {"masked": 0.0, "alone_bf16": 0.0, "unmasked": 0.0}
    elements = documents = 0
    for b in range(x.shape[0]):
        for d in range(int(ids[b, -1]) + 1):  # sync point per row: the documents to loop over
            where = ids[b] == d
            doc = x[b : b + 1, where]
            exact = model(doc)[0].float()  # float32, no autocast: the reference
            with autocast(device, smoke):
                alone = model(doc)[0].float()
            for name, got in (("masked", masked[b, where]), ("alone_bf16", alone), ("unmasked", unmasked[b, where])):
                err = (got - exact).abs()
                worst[f"{name}_max"] = max(worst[f"{name}_max"], float(err.max()))
                sums[name] += float(err.sum())
            elements += exact.numel()
            documents += 1
    means = {f"{name}_mean": total / elements for name, total in sums.items()}
    return {"documents": documents, **worst, **means}


def timed_rounds(device: torch.device, fns: dict, steps: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each function, its turns interleaved (the first alternating), after one warm-up turn."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds + 1):
        names = list(fns) if r % 2 == 0 else list(reversed(fns))
        for name in names:
            sync()
            begin = time.perf_counter()
            for _ in range(steps):
                fns[name]()
            sync()  # sync point: the turn's kernels are done
            if r > 0:  # round 0 warms up: compiles, autotunes, allocates
                times[name].append((time.perf_counter() - begin) / steps)
    return times


def summary(times: dict[str, list[float]], baseline: str) -> dict:
    out = {f"{name}_ms": 1e3 * statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        if name != baseline:
            ratios = [b / m for b, m in zip(times[baseline], t, strict=True)]
            out[f"{name}_throughput_vs_{baseline}"] = statistics.median(ratios)
            out[f"{name}_throughput_range"] = f"{min(ratios):.3f}..{max(ratios):.3f}"
    return out


def attention_speed(s: dict, device: torch.device, smoke: bool, rounds: int) -> dict:
    heads, d_head = s["num_heads"], s["d_model"] // s["num_heads"]
    dtype = torch.float32 if smoke else torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(s["B"], heads, s["T"], d_head, device=device, dtype=dtype, generator=g) for _ in range(3))
    ids = doc_ids(windows(s, device), EOT)
    block_mask = document_attention(ids, use_flex=True).mask
    results = {}
    build = timed_rounds(device, {"block_mask_build": lambda: document_attention(ids, use_flex=True)}, 5, rounds)
    results["block_mask_build_ms"] = 1e3 * statistics.median(build["block_mask_build"])
    for backward in [False] if smoke else [False, True]:  # FlexAttention has no CPU backward
        times = attention_pass(q, k, v, block_mask, backward, 3 if smoke else 20, rounds)
        label = "fwd_bwd" if backward else "fwd"
        results.update({f"attention_{label}_{key}": value for key, value in summary(times, "sdpa_causal").items()})
    return results


def attention_pass(q, k, v, block_mask, backward: bool, steps: int, rounds: int) -> dict[str, list[float]]:
    """SDPA is_causal against FlexAttention under ``block_mask``, on q, k, v (B, H, T, d), with backward or not."""
    for t in (q, k, v):
        t.requires_grad_(backward)

    def run(attend):
        with torch.set_grad_enabled(backward):
            y = attend()
            if backward:
                y.sum().backward()

    fns = {
        "sdpa_causal": lambda: run(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        "flex_doc_mask": lambda: run(lambda: flex_attend(q, k, v, block_mask, enable_gqa=False)),
    }
    return timed_rounds(q.device, fns, steps, rounds)


def model_speed(model: TransformerLM, x: torch.Tensor, smoke: bool, rounds: int) -> dict:
    ids = doc_ids(x, EOT)

    def step(masked: bool):
        with autocast(x.device, smoke):
            logits = model(x, doc_ids=ids if masked else None)
        logits.float().square().mean().backward()  # gradients accumulate: the cost is the same
        model.zero_grad(set_to_none=True)

    fns = {"sdpa_causal": lambda: step(False), "doc_mask": lambda: step(True)}  # doc_mask: FlexAttention on CUDA
    times = timed_rounds(x.device, fns, 2 if smoke else 5, rounds)
    return {f"model_fwd_bwd_{key}": value for key, value in summary(times, "sdpa_causal").items()}


def verdicts(r: dict) -> list[tuple[str, str, str]]:
    t, out = THRESHOLDS, []
    limit_max = t["masked_err_vs_bf16_alone_err"] * r["alone_bf16_max"] + t["err_floor"]
    out.append(("masked_max_err", r["masked_max"] <= limit_max, f"{r['masked_max']:.4g} <= {limit_max:.4g}"))
    limit_mean = t["masked_err_vs_bf16_alone_err"] * r["alone_bf16_mean"] + t["err_floor"] / 10
    out.append(("masked_mean_err", r["masked_mean"] <= limit_mean, f"{r['masked_mean']:.4g} <= {limit_mean:.4g}"))
    need = t["unmasked_diff_vs_masked_err"] * r["masked_mean"]
    out.append(("unmasked_differs", r["unmasked_mean"] >= need, f"{r['unmasked_mean']:.4g} >= {need:.4g}"))
    ratio, need = r["model_fwd_bwd_doc_mask_throughput_vs_sdpa_causal"], t["masked_model_throughput"]
    out.append(("masked_model_throughput", ratio >= need, f"{ratio:.3f} >= {need}"))
    return [(name, "PASS" if ok else "FAIL", text) for name, ok, text in out]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the script runs")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 6; smoke 2)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --smoke")
    device = torch.device("cpu" if args.smoke else "cuda")
    s, rounds = shape(args.smoke), args.rounds or (2 if args.smoke else 6)
    results: dict = {"torch": torch.__version__, "smoke": args.smoke, "shape": s, "thresholds": THRESHOLDS}
    results["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    model, x = make_model(s, device), windows(s, device)
    results.update(numbers(model.eval(), x, args.smoke))  # on the CPU the masked path is the dense SDPA mask
    results.update(attention_speed(s, device, args.smoke, rounds))
    results.update(model_speed(model.train(), x, args.smoke, rounds))
    smoke_reason = "a CPU run says nothing about FlexAttention on a GPU"
    return report("gpu_flex", results, verdicts(results), args.out, args.smoke, smoke_reason)


if __name__ == "__main__":
    sys.exit(main())
