"""What the user sees: a progress display, a JSONL metrics file, and optional W&B and TensorBoard.

Only the main process (rank 0) creates a MetricsLog. Records are flat dicts whose keys say what they hold
(``train_loss``, ``val_loss``, ``val_bpb``, ``lr``, ``tokens_per_s``, ``data_stall_pct``...), one JSON object per
line in ``out_dir/metrics.jsonl``, flushed as written so that a killed run keeps every record up to its last step.
``val_bpb`` (bits per byte) is there when the validation data's manifest names its tokenizer.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

METRICS_NAME = "metrics.jsonl"  # OUT_DIR/metrics.jsonl

# Dense (no 2:4 sparsity) bf16 tensor-core peak FLOP/s, from the vendors' datasheets (NVIDIA quotes "with
# sparsity" figures, twice these), keyed by the exact name torch.cuda.get_device_name returns: a substring match
# would read an L40S as an L4 and an H100 PCIe as an SXM. A GPU not listed gets no MFU rather than a guess.
PEAK_BF16_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989.4e12,  # H100 SXM5
    "NVIDIA H100 PCIe": 756.5e12,
    "NVIDIA H100 NVL": 835.5e12,
    "NVIDIA H200": 989.4e12,  # H200 SXM
    "NVIDIA H200 NVL": 835.5e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA L4": 121e12,
    "NVIDIA L40S": 362.05e12,
    "NVIDIA L40": 181.05e12,
    "NVIDIA A10": 125e12,
    "NVIDIA GeForce RTX 4090": 165.2e12,  # with fp32 accumulation, as autocast's matmuls do (Ada whitepaper)
}


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of the GPU named exactly ``device_name``; None for a GPU not in the table."""
    return PEAK_BF16_FLOPS.get(device_name.strip())


def flops_per_token(non_embedding_parameters: int, num_layers: int, d_model: int, context_length: int) -> int:
    """Training FLOPs per token (forward and backward) of a decoder-only Transformer, as in the PaLM paper's MFU:
    6 per matmul weight (the token-embedding lookup is a gather, not a matmul, so it is excluded; the untied LM
    head is a matmul and counts) plus 12 * layers * d_model * T for the attention scores and their weighted sum."""
    return 6 * non_embedding_parameters + 12 * num_layers * d_model * context_length


def perplexity(loss: float) -> float:
    """exp(loss), the mean cross-entropy in nats as a perplexity; capped at exp(700), since exp overflows a float
    past about 709 (a diverged model's loss stays printable)."""
    return math.exp(min(loss, 700))


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLog:
    def __init__(
        self,
        out_dir: Path,
        config: dict,
        total_steps: int,
        start_step: int,
        wandb_project: str | None,
        tensorboard: bool,
    ):
        self.path = out_dir / METRICS_NAME
        self.file = open(self.path, "a", buffering=1)  # noqa: SIM115 - closed in close(); line-buffered
        self.total_steps = total_steps
        self.start_time, self.start_step = time.perf_counter(), start_step
        self.bar = self._make_bar(start_step)
        self.wandb = self._start_wandb(wandb_project, config, out_dir)
        self.tb = self._start_tensorboard(out_dir) if tensorboard else None

    def _make_bar(self, start_step: int):
        if not sys.stderr.isatty():
            return None  # plain lines when output goes to a file or a pipe
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=self.total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    @staticmethod
    def _start_wandb(project, config, out_dir):
        if not project:
            return None
        import wandb  # checked at start-up: preflight reports a missing package

        return wandb.init(project=project, config=config, dir=str(out_dir), resume="allow")

    @staticmethod
    def _start_tensorboard(out_dir):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    def eta(self, step: int) -> str:
        done = step - self.start_step
        if done <= 0:
            return "?"
        rate = (time.perf_counter() - self.start_time) / done
        return format_duration(rate * (self.total_steps - step))

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        step = record["step"]
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)
        if self.tb is not None:
            for key, value in numbers.items():
                self.tb.add_scalar(key, value, step)
        self._show(record)

    def _show(self, r: dict) -> None:
        if "train_loss" in r:
            parts = [
                f"loss {r['train_loss']:.4f}",
                f"lr {r['lr']:.2e}",
                f"{r['tokens_per_s']:,.0f} tok/s",
                f"stall {r['data_stall_pct']:.1f}%",
            ]
            if r.get("mfu_pct") is not None:
                parts.append(f"MFU {r['mfu_pct']:.1f}%")
        else:
            parts = [f"val_loss {r['val_loss']:.4f}", f"val_ppl {r['val_ppl']:.2f}"]
            if r.get("val_bpb") is not None:
                parts.append(f"val_bpb {r['val_bpb']:.4f}")
        if self.bar is not None:
            self.bar.n = r["step"]
            self.bar.set_postfix_str(" | ".join(parts), refresh=True)
        else:
            line = f"step {r['step']}/{self.total_steps} | " + " | ".join(parts) + f" | ETA {self.eta(r['step'])}"
            print(line, flush=True)

    def message(self, text: str) -> None:
        (self.bar.write if self.bar is not None else print)(text)
        sys.stdout.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.file.close()
