"""The training loop: model, optimizer, loaders and checkpoints put together, resumable bit for bit.

Exactness of resume (same seed, same settings, CPU): a checkpoint holds the model, the optimizer (with its
step counts), the GradScaler, every RNG state, and the loader's position (global rows consumed). The learning
rate is a function of the step, evaluation uses a fixed set of validation batches and changes no state, so a run
resumed from step c repeats steps c+1.. exactly as the uninterrupted run did. An optimizer step takes
batch_size x grad_accum_steps x world_size rows of one global sample stream (rank r's micro-batch m of step s:
B consecutive rows of that step's), so a run resumed under another world size or per-rank batch at the same
product takes the same rows at every step, and matches the uninterrupted run up to float summation order.

Mixtures (``--train-data`` with weights, :class:`lmdata.Mixture`): train records carry ``tokens/NAME``, the
training tokens read from each source so far, computed from the mixture's tree for the global rows consumed
(:meth:`lmdata.mixture.MixtureSampler.rows_per_source`, no replay) and saved in the checkpoint
(``source_tokens``), so they add up across resumes, also across an allowed change of the mixture. Several val
sets are each scored on their own fixed batches; see :meth:`Trainer.evaluate` for what is logged.

Documents: the train loader and the fixed val batches take the run's ``--windows``; with ``--doc-mask`` each
micro-batch and each val batch passes the model doc ids computed from its tokens on the device (no sync).

Sync points (host waits for the GPU) per step: one, in :func:`lmtrain.runtime.agree_on_step`, reading the loss
plus the gradient norm (to stop *before* a non-finite update) together with the stop flag (SIGTERM/SIGINT).
Under torchrun both travel in ONE all_reduce of a (2,) tensor, so a non-finite value or a signal on any rank
stops every rank at the same step (no rank is left waiting in a collective). With ``--dtype float16`` the
GradScaler adds its own (``scaler.step`` reads its inf flags). Logging reads values accumulated on the device
only at log intervals, checkpoints copy the state to the host only at checkpoint steps.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from lmdata import BatchLoader, Mixture, SamplerStateError, TokenDataset
from lmtrain.checkpoint import restore
from lmtrain.checkpoint_manager import CheckpointManager
from lmtrain.config import MAX_SEED, TrainConfig
from lmtrain.datasources import as_val_sets, open_train, open_val, val_weights
from lmtrain.documents import DocMask, document_ids
from lmtrain.errors import ConfigError, NonFiniteLossError
from lmtrain.evaluate import score_batches, token_bytes_on, weighted_mean
from lmtrain.metrics import MetricsLog, flops_per_token, peak_flops, perplexity
from lmtrain.model import TransformerLM
from lmtrain.optim import lr_cosine_schedule, make_optimizer
from lmtrain.resume import check_fits_run, choose_start, epoch_warning, starts_new_stream
from lmtrain.rng import capture_rng_state, restore_rng_state
from lmtrain.rundir import trim_metrics
from lmtrain.runtime import Runtime, agree_on_step
from lmtrain.source_tokens import SourceTokens

VAL_SEED_OFFSET = 1_000_003  # the validation batches' sampler seed: fixed, and distinct from training's


Datasets = tuple[TokenDataset | Mixture, TokenDataset | Mapping[str, TokenDataset]]


class Trainer:
    def __init__(self, config: TrainConfig, runtime: Runtime, datasets: Datasets | None = None):
        """``datasets``: (train, val) already opened and checked (by preflight); else opened from the config. train:
        a dataset or a Mixture; val: a dataset, or several by name (each evaluated on its own fixed batches and
        logged under its name, see :meth:`evaluate`)."""
        self.c, self.rt = config, runtime
        c, rt = config, runtime
        torch.manual_seed(c.run.seed)
        self.out_dir = Path(c.data.out_dir)
        self.model = TransformerLM(**vars(c.model)).to(rt.device)
        self.optimizer = make_optimizer(
            self.model, c.optim.lr, c.optim.weight_decay, (c.optim.beta1, c.optim.beta2), c.optim.eps
        )
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
        self.train_model = self._wrap(self.model)
        if datasets is None:
            datasets = open_train(c.data.train_data), open_val(c.data.val_data)
        self.train_data, self.val_sets = datasets[0], as_val_sets(datasets[1])
        self.val_weights = val_weights(self.train_data, list(self.val_sets))
        # --doc-mask: the eot id and delimiter preflight resolved into the config; training and evaluation alike
        self.doc_mask = DocMask(c.data.eot_id, c.data.delimiter) if c.run.doc_mask else None
        self.loader = BatchLoader(
            self.train_data,
            c.run.batch_size,
            c.model.context_length,
            rt.device,
            c.run.sampler,
            c.run.seed,
            c.run.prefetch,
            rt.rank,
            rt.world_size,
            **c.loader_windows,
        )
        self.val_batches = {name: self._fixed_val_batches(ds) for name, ds in self.val_sets.items()}
        # UTF-8 bytes per id, int64 (V,) on the device, for val_bpb; None when no manifest names the tokenizer
        self.val_token_bytes = {
            name: token_bytes_on(ds, c.model.vocab_size, rt.device)[0] if rt.is_main else None
            for name, ds in self.val_sets.items()
        }
        self.manager = CheckpointManager(
            self.out_dir, c.checkpoint.keep_checkpoints, c.checkpoint.milestone_every, c.checkpoint.async_checkpoint
        )
        self.step = 0
        self.stop_requested = False
        self.log: MetricsLog | None = None
        self.tokens_per_source = SourceTokens(self.train_data, c.model.context_length)  # a Mixture's tokens/NAME

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.rt.distributed:
            ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            # No buffer needs syncing (RoPE tables are derived from the config), so skip the broadcast.
            model = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        return torch.compile(model) if self.c.run.compile else model

    def _fixed_val_batches(self, dataset: TokenDataset) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same ``eval_batches`` batches of ``dataset`` at every evaluation, on every rank (only rank 0
        evaluates): one seed for every val set, so each set's batches depend on that set alone."""
        c = self.c
        with BatchLoader(
            dataset,
            c.run.batch_size,
            c.model.context_length,
            self.rt.device,
            "random",
            (c.run.seed + VAL_SEED_OFFSET) % (MAX_SEED + 1),
            prefetch=1,
            rank=0,
            world_size=1,
            **c.loader_windows,  # evaluation sees the windows training does
        ) as loader:
            return [tuple(t.clone() for t in next(loader)) for _ in range(c.log.eval_batches)]

    # -- state ----------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),  # the plain model: no wrapper prefixes
            "optimizer": self.optimizer.state_dict(),
            "iteration": self.step,
            "scaler": self.scaler.state_dict(),
            "rng": capture_rng_state(self.rt.device),
            "loader": self.loader.state_dict(),  # global rows consumed: the same on every rank
            "world_size": self.rt.world_size,
            "config": self.c.to_dict(),
            "data": self.data_fingerprint(),
            "source_tokens": self.source_tokens(),  # {name: int}; {} for one dataset
        }

    def resume(self, allow_config_change: bool) -> None:
        """Restore the checkpoint :func:`choose_start` picks (or start afresh); the run dir's lock is held."""
        c, writer = self.c, self.rt.is_main  # only rank 0 holds the lock and writes
        if writer:
            self.manager.remove_stale()  # temporaries a killed writer left
        found = choose_start(c, self.manager, writer)
        if found is None:
            if writer and trim_metrics(self.out_dir, None):
                self._say(f"starting at step 0: {self.out_dir / 'metrics.jsonl'} of an earlier attempt is replaced")
            return
        path, obj = found
        check_fits_run(path, obj, c, self.data_fingerprint(), allow_config_change, self.rt.world_size)
        restore(obj, self.model, self.optimizer)
        if obj.get("scaler"):
            self.scaler.load_state_dict(obj["scaler"])
        restore_rng_state(obj["rng"], self.rt.device)
        try:
            identity = self.loader.sampler.identity()
            new_data = starts_new_stream(obj["loader"], identity, allow_config_change)
            self.loader.load_state_dict(obj["loader"], new_stream=new_data)
        except SamplerStateError as e:
            raise ConfigError(f"{path}: {e}") from None
        if new_data and (warning := epoch_warning(obj["loader"], identity)) is not None:
            self._say(f"{path}: {warning}")
        self.step = obj["iteration"]
        self.tokens_per_source.resume(obj, self.loader, self._say, str(path))
        if writer:
            trim_metrics(self.out_dir, self.step)
        self._say(f"resumed from {path} at step {self.step}")

    def source_tokens(self) -> dict[str, int]:
        """Training tokens read from each source of a Mixture so far ({} for one dataset): ``SourceTokens``."""
        return self.tokens_per_source.counts(self.loader)

    def data_fingerprint(self) -> dict:
        """The train data's fingerprint and the val data's: one set's as before, several by name."""
        vals = {name: ds.fingerprint() for name, ds in self.val_sets.items()}
        return {"train": self.train_data.fingerprint(), "val": next(iter(vals.values())) if len(vals) == 1 else vals}

    # -- the loop -------------------------------------------------------------------------------------------
    def train(self) -> None:
        """Train to max_steps, after :meth:`resume`. Raises NonFiniteLossError; returns normally on completion or
        SIGTERM/SIGINT. A run resumed at max_steps is already finished: no step runs and no checkpoint is written."""
        c, rt = self.c, self.rt
        if self.step >= c.run.max_steps:
            self._say(f"the run is already at step {self.step} = --max-steps: nothing to do")
            self.loader.close()
            return
        if rt.is_main:
            self.log = MetricsLog(
                self.out_dir, self.c.to_dict(), c.run.max_steps, self.step, c.log.wandb_project, c.log.tensorboard
            )
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            if self.step == 0 and rt.is_main:
                self.evaluate()  # the val loss before training, for comparison
            self._loop()
            if not self.stop_requested and rt.is_main:
                self.evaluate()
            self.save()
            self.manager.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.loader.close()
            if self.log is not None:
                self.log.close()

    def _on_signal(self, signum, frame) -> None:
        if self.stop_requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop_requested = True
        self._say(f"received {signal.Signals(signum).name}: finishing step {self.step + 1}, then checkpointing")

    def _loop(self) -> None:
        c = self.c
        tokens_per_step = self._tokens_per_step()
        loss_sum, window_steps = torch.zeros((), device=self.rt.device), 0
        window_start, paused = time.perf_counter(), 0.0  # evaluation and checkpoint time is not training time
        self.loader.stats.reset()
        while self.step < c.run.max_steps:
            loss, stop = self._train_step()
            loss_sum += loss
            self.step += 1
            window_steps += 1
            if self.step % c.log.log_interval == 0 or self.step == c.run.max_steps:
                elapsed = time.perf_counter() - window_start - paused
                self._log_train(loss_sum.item() / window_steps, elapsed, window_steps * tokens_per_step)
                loss_sum.zero_()
                window_start, paused, window_steps = time.perf_counter(), 0.0, 0
                self.loader.stats.reset()
            pause_start = time.perf_counter()
            eval_due = c.log.eval_interval and self.step % c.log.eval_interval == 0
            if eval_due and self.step < c.run.max_steps and self.rt.is_main:
                self.evaluate()
            if stop:  # agreed by every rank in the step's collective, so all ranks leave at this step
                self.stop_requested = True
                return
            if self.step % c.checkpoint.checkpoint_interval == 0 and self.step < c.run.max_steps:
                self.save()
            paused += time.perf_counter() - pause_start

    def _train_step(self) -> tuple[torch.Tensor, bool]:
        """One optimizer step over grad_accum_steps micro-batches: (mean loss as a device scalar, whether any rank
        was asked to stop)."""
        c, model = self.c, self.train_model
        lr = lr_cosine_schedule(self.step, c.optim.lr, c.optim.min_lr, c.optim.warmup_steps, self.c.lr_decay_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = c.run.grad_accum_steps
        total = torch.zeros((), device=self.rt.device)
        for micro in range(accum):
            x, y = next(self.loader)  # int64 (B, T) on the device, prefetched
            # DDP all-reduces gradients in the last micro-batch's backward only. no_sync() is a one-shot context
            # manager, so each micro-batch gets a fresh one, around both its forward and its backward.
            skip_sync = self.rt.distributed and micro < accum - 1
            with model.no_sync() if skip_sync else contextlib.nullcontext():
                with self.rt.autocast():
                    logits = model(x, document_ids(x, self.doc_mask))  # (B, T, V); doc ids on x's device, no sync
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / accum
                self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        clip = c.optim.grad_clip if c.optim.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        # The step's one sync point (and, under torchrun, its one collective besides DDP's): stop before a
        # non-finite update reaches the weights (fp16 overflows are the scaler's job), and learn whether any rank
        # was signalled.
        check = total if self.scaler.is_enabled() else total + grad_norm
        finite, stop = agree_on_step(check, self.stop_requested, self.rt)
        if not finite:
            raise NonFiniteLossError(
                f"step {self.step + 1}: the loss or gradient norm (here: {total.item()} / {grad_norm.item()}; "
                "under torchrun, on some rank) is not finite; stopped before the optimizer step, the last "
                "checkpoint is intact. Lower --lr or raise --warmup-steps"
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_lr, self.last_grad_norm = lr, grad_norm
        return total, stop

    def _log_train(self, loss: float, elapsed: float, tokens: int) -> None:
        if self.log is None:
            return
        record = {
            "event": "train",
            "step": self.step,
            "tokens": self._tokens_seen(),
            "train_loss": loss,
            "lr": self.last_lr,
            "grad_norm": float(self.last_grad_norm),
            "tokens_per_s": tokens / elapsed,
            "data_stall_pct": 100 * self.loader.stats.wait_seconds / elapsed,
            "elapsed_s": elapsed,
        }
        record |= {f"tokens/{name}": n for name, n in self.source_tokens().items()}
        mfu = self._mfu(tokens / elapsed)
        if mfu is not None:
            record["mfu_pct"] = mfu
        self.log.log(record)

    def _tokens_seen(self) -> int:
        """Training tokens of every rank so far: the global rows consumed (all ranks, every step since the run
        began, whatever global batch earlier segments of it had) times the context length."""
        return self.loader.rows * self.c.model.context_length

    def _tokens_per_step(self) -> int:
        c = self.c
        return c.run.batch_size * c.model.context_length * c.run.grad_accum_steps * self.rt.world_size

    def _mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation in percent of the GPUs' dense bf16 peak; None on a CPU or an unknown GPU."""
        if self.rt.device.type != "cuda":
            return None
        if not hasattr(self, "_peak_flops"):  # looked up, and an unknown GPU reported, once per run
            name = torch.cuda.get_device_name(self.rt.device)
            self._peak_flops = peak_flops(name)
            if self._peak_flops is None:
                self._say(f"MFU not reported: unknown GPU {name!r} (not in lmtrain.metrics.PEAK_BF16_FLOPS)")
        if self._peak_flops is None:
            return None
        m = self.c.model
        per_token = flops_per_token(
            self.model.num_parameters(exclude_embeddings=True), m.num_layers, m.d_model, m.context_length
        )
        return 100 * per_token * tokens_per_s / (self._peak_flops * self.rt.world_size)

    def evaluate(self) -> float:
        """Score every val set; log ``val_loss`` (with several sets: their mean weighted by ``val_weights``, and
        each as ``val_loss/NAME``), ``val_ppl`` and, when every set's tokenizer is known, ``val_bpb``."""
        # the plain model, not the compiled/DDP wrapper: no collectives, no recompiles
        scores = {
            name: score_batches(self.model, batches, self.val_token_bytes[name], self.rt.autocast, self.doc_mask)
            for name, batches in self.val_batches.items()
        }
        loss, bpb = weighted_mean(scores, self.val_weights)
        if self.log is not None:
            record = {
                "event": "eval",
                "step": self.step,
                "tokens": self._tokens_seen(),
                "val_loss": loss,
                "val_ppl": perplexity(loss),
            }
            if bpb is not None:
                record["val_bpb"] = bpb
            if len(scores) > 1:  # one set is logged as before: its loss is val_loss
                for name, score in scores.items():
                    record[f"val_loss/{name}"] = score.loss
                    if score.bpb is not None:
                        record[f"val_bpb/{name}"] = score.bpb
            self.log.log(record)
        return loss

    def save(self) -> None:
        if self.rt.is_main:
            path = self.manager.save(self.step, self.state())
            self._say(f"checkpoint: {path}" + (" (writing in the background)" if self.manager.async_save else ""))

    def _say(self, text: str) -> None:
        if not self.rt.is_main:
            return
        if self.log is not None:
            self.log.message(text)
        else:
            print(text, flush=True)
