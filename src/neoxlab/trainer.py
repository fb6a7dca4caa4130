"""The one training loop, used by the CLI, the notebooks and clusters alike."""

from __future__ import annotations

import dataclasses
import datetime
import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch.distributed.tensor import DTensor

from neoxlab import __version__, distributed
from neoxlab.adapters import LoraSpec, check_lora_runtime, load_adapter_weights
from neoxlab.atomic import remove_temporaries
from neoxlab.checkpoint import (
    check_model_state,
    latest_checkpoint,
    load_training_state,
    load_weights,
    read_state,
    save_checkpoint,
)
from neoxlab.config import Config, model_config, padded_vocab_size, save_config
from neoxlab.data.batches import Sampler, on_device
from neoxlab.data.prepare import PreparedData, build_samplers, prepare_data
from neoxlab.errors import NeoxlabError
from neoxlab.evaluate import CODE_METRICS, evaluate_run, format_code_metrics
from neoxlab.hf import (
    apply_init_from,
    base_fingerprint,
    check_base,
    init_from_rows,
    init_lora_model,
    init_model,
)
from neoxlab.interrupt import StopOnSignal
from neoxlab.loss_scale import build_grad_scaler
from neoxlab.memory_check import check_memory, memory_error
from neoxlab.model import GPTNeoX
from neoxlab.optim import build_optimizer, clip_gradients, lr_at, set_lr
from neoxlab.resume_schedule import schedule_on_resume
from neoxlab.runtime import Runtime, model_flops_utilization, resolve_runtime
from neoxlab.tokenizer import encode, load_tokenizer, save_tokenizer
from neoxlab.tracking import Progress, Tracker, new_run_dir, run_info

SAMPLE_TEMPERATURE = 0.8
SAMPLE_TOP_K = 200


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    train_loss: float | None
    best_val_loss: float | None
    last_eval: dict[str, float]
    finished: bool  # False when exit-interval or a signal stopped the run early
    stopped_by: str | None = None  # SIGINT / SIGTERM when a signal stopped it (checkpointed)


def checkpoint_root(config: Config, run_dir: Path) -> Path | None:
    """Where checkpoints go: `save` resolved inside the run directory (None: not saving)."""
    if not config.save:
        return None
    return run_dir / config.save


def sample_text(
    model: GPTNeoX,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    eod_id: int,
    device: torch.device,
    seed: int,
) -> str:
    """A short sample for the run log (fixed seed, so samples along a run are comparable)."""
    ids = encode(tokenizer, prompt) or [eod_id]
    ids = ids[-model.config.max_position_embeddings :]
    generator = torch.Generator(device=device).manual_seed(seed)
    prompt_ids = torch.tensor([ids], device=device)
    was_training = model.training
    model.eval()
    new_ids = [
        int(token[0])
        for token in model.generate(
            prompt_ids,
            max_new_tokens,
            temperature=SAMPLE_TEMPERATURE,
            top_k=SAMPLE_TOP_K,
            eos_token_id=eod_id,
            generator=generator,
        )
    ]
    model.train(was_training)
    return prompt + tokenizer.decode(new_ids, skip_special_tokens=True)


def build_model(
    config: Config,
    tokenizer: Tokenizer,
    device: torch.device,
    train_device_type: str | None = None,
    compute_dtype: torch.dtype | None = None,
) -> GPTNeoX:
    """The model, built on `device` (meta when sharded), to train on `train_device_type` (None:
    shapes or inference only) in `compute_dtype` (QLoRA's 4-bit layers need it); see
    model_config. With lora-rank, init-from's frozen model with LoRA adapters."""
    if config.lora_rank:
        lora = init_lora_model(config, tokenizer, train_device_type, compute_dtype)
        return lora.model.to(device)
    if config.init_from:
        return init_model(config, tokenizer, device, train_device_type)
    vocab = padded_vocab_size(tokenizer.get_vocab_size(), config.make_vocab_size_divisible_by)
    return GPTNeoX(model_config(config, vocab, train_device_type)).to(device)


def _quiet(message: str) -> None:
    """The log of ranks other than 0."""


class _Silent:
    """Stands in for the tracker and progress bar on ranks other than 0: every call is a no-op."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _runtime_and_world(
    config: Config, log: Callable[[str], None]
) -> tuple[Runtime, distributed.World]:
    """Device, precision and compilation for this hardware; joins torchrun's process group."""
    runtime = resolve_runtime(
        config.device,
        config.requested_precision(),
        config.compile,
        notice=log,
        compile_mode=config.compile_mode,
    )
    if runtime.cuda_graphs and distributed.world_from_environment().distributed:
        raise NeoxlabError(
            f"compile-mode {config.compile_mode} captures CUDA graphs, which neoxlab "
            "supports on one GPU only",
            hint="use compile-mode=default (or max-autotune-no-cudagraphs) under torchrun",
        )
    timeout = datetime.timedelta(seconds=config.distributed_timeout)
    world, device = distributed.init_world(runtime.device, timeout, config.offload_optimizer())
    return dataclasses.replace(runtime, device=device), world


class StepHealth:
    """What the steps since the last check left on the device, kept there so that the hot loop
    never waits for the GPU: the first step whose loss or gradient norm was not finite (with
    both values), and how many steps had non-finite gradients (under fp16 the GradScaler skipped
    exactly those: it skips a step when an unscaled gradient is inf/NaN, which makes the norm
    inf/NaN). `Trainer._check_health` reads them in one sync."""

    def __init__(self, device: torch.device) -> None:
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_values = torch.zeros(2, device=device)  # loss, grad norm of that step
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, fp16: bool) -> None:
        if isinstance(grad_norm, DTensor):  # FSDP2's norm, as a plain tensor (same on all ranks)
            grad_norm = grad_norm.full_tensor()
        finite_grads = torch.isfinite(grad_norm)
        if fp16:  # overflow is expected: the scaler skips the step and lowers the scale
            self.skipped += ~finite_grads
            return
        # a non-finite gradient has already reached the weights through the optimizer step
        first = (~torch.isfinite(loss) | ~finite_grads) & (self.first_bad_step < 0)
        values = torch.stack([loss.detach().float(), grad_norm.detach().float()])
        self.bad_values = torch.where(first, values, self.bad_values)
        self.first_bad_step = torch.where(first, step, self.first_bad_step)

    def read(self) -> tuple[int, float, float, int]:
        """(first bad step or -1, its loss, its grad norm, skipped steps); resets `skipped`."""
        packed = torch.cat(
            [
                self.first_bad_step[None].double(),
                self.bad_values.double(),
                self.skipped[None].double(),
            ]
        )
        first_bad, loss, grad_norm, skipped = packed.tolist()
        self.skipped.zero_()
        return int(first_bad), loss, grad_norm, int(skipped)


@dataclass
class _LoopState:
    """What one `Trainer.run` carries from step to step besides the Trainer's own counters."""

    model: torch.nn.Module  # what the steps run: DDP-wrapped and compiled where that applies
    end: int  # the step this run stops after
    tracker: Tracker | _Silent
    progress: Progress | _Silent
    flops_per_token: int
    peak_flops: float | None  # None where the device's peak is unknown: no MFU
    last_eval: dict[str, float]
    train_loss: float | None = None  # at the last logged step
    checkpoint: Path | None = None  # the last one this run saved
    # Tokens/s window: from the last logged step, less the time spent evaluating and saving.
    window_start: float = dataclasses.field(default_factory=time.perf_counter)
    window_tokens: int = 0


class Trainer:
    """Holds the state of one run; `run()` trains until train-iters or exit-interval."""

    def __init__(
        self,
        config: Config,
        *,
        config_files: Sequence[str | Path] = (),
        resume: Path | None = None,
        log: Callable[[str], None] = print,
        progress: bool = True,
    ) -> None:
        self.config_files = [str(p) for p in config_files]
        if not distributed.world_from_environment().is_main:
            log = _quiet  # only rank 0 talks
        self.log = log
        self.show_progress = progress
        # init-from decides the architecture and tokenizer; the run's config.yml records them
        self.config = config = apply_init_from(config, log)
        self.runtime, self.world = _runtime_and_world(config, log)
        # FSDP2 shards across ranks, or offloads to host memory (one process included)
        fsdp = self.world.distributed and config.distributed_mode() == "fsdp"
        self.sharded = fsdp or config.offload_optimizer()
        self.lora = LoraSpec.from_options(config)
        check_lora_runtime(self.lora, self.runtime.device.type, self.sharded, config.init_from)
        # Before any data work: a run that cannot fit stops here, saying what would fit.
        self.memory = check_memory(
            config, self.runtime, self.world, self.sharded, log, init_from_rows(config)
        )
        # LoRA checkpoints hold only adapters: they name the base model and its hash.
        self.base_model = base_fingerprint(config.init_from) if self.lora else None
        self.micro_batch, self.accumulation, self.global_batch = config.batch_geometry(
            self.world.world_size
        )
        torch.manual_seed(config.seed)
        self.data: PreparedData = self._prepare_data()
        self.model = self._build_model()
        self.optimizer = build_optimizer(self.model, config)
        # Sharded gradients: each rank sees only its shard, so overflow is agreed across ranks.
        self.scaler = build_grad_scaler(
            self.runtime.device.type, self.runtime.precision == "fp16", config.fp16, self.sharded
        )
        self.step = 0
        self.tokens = 0
        self.best_val_loss: float | None = None
        self.elapsed = 0.0
        self.skipped_steps = 0
        self.health = StepHealth(self.runtime.device)
        self.wandb_run: dict[str, str] | None = None  # {id, project}: --resume continues it
        self.stopped_by: str | None = None
        # Rank 0's choice of run wins (see _resume): under torchrun every rank is handed one.
        resume = distributed.broadcast_from_main(resume, self.world)
        if resume is not None:
            self.run_dir = resume
            self._resume()
        else:
            created = new_run_dir(config.run_name) if self.world.is_main else None
            self.run_dir = distributed.broadcast_from_main(created, self.world)
        self.train_sampler, self.val_sampler = self._build_samplers()

    def _prepare_data(self) -> PreparedData:
        """Rank 0 tokenizes and caches first; the other ranks then read its cache."""
        if self.world.is_main:
            data = prepare_data(self.config, self.log)
        distributed.barrier(self.world)
        if not self.world.is_main:
            data = prepare_data(self.config, _quiet)
        return data

    def _build_model(self) -> GPTNeoX:
        device = self.runtime.device
        if not self.sharded:
            return build_model(
                self.config, self.data.tokenizer, device, device.type, self.runtime.dtype
            )
        return distributed.build_sharded(
            lambda where: build_model(self.config, self.data.tokenizer, where, device.type),
            self.world,
            self.runtime.device,
            self.runtime.dtype,
            offload=self.config.offload_optimizer(),
        )

    def _build_samplers(self) -> tuple[Sampler, Sampler]:
        train_sampler, val_sampler = build_samplers(self.config, self.data)
        # Same batches, fed faster: small corpora on the GPU, others prefetched (batches.py).
        device = self.runtime.device
        return on_device(train_sampler, device), on_device(val_sampler, device, prefetch=False)

    # ---- resume -------------------------------------------------------------------------------

    def _resume(self) -> None:
        # Rank 0 alone picks the checkpoint and reads its state, and every rank takes both:
        # another rank's view of a shared filesystem may lag (NFS caches directory listings),
        # and ranks that started from different steps would train on different batches.
        checkpoint, state = distributed.decided_by_main(self._checkpoint_to_resume, self.world)
        # Rank 0 reads the full state; load_full_state hands each rank its part. LoRA adapters
        # are megabytes and never sharded: every rank reads them.
        weights, training = {}, {}
        if self.world.is_main or self.lora:
            weights = load_weights(checkpoint)
        if self.lora:
            load_adapter_weights(self.model, weights, checkpoint)
        elif self.world.is_main:
            check_model_state(self.model, weights, checkpoint)
        if self.world.is_main:
            training = load_training_state(checkpoint)
        distributed.load_full_state(
            self.model,
            self.optimizer,
            weights,
            training.get("optimizer", {}),
            self.world,
            optimizer_only=self.lora is not None,
        )
        small = distributed.broadcast_from_main(
            {"scaler": training.get("scaler"), "rng": training.get("rng")}, self.world
        )
        self.scaler.load_state_dict(small["scaler"])
        _restore_rng(small["rng"], self.runtime.device)
        self.step = state["step"]
        self.tokens = state["tokens"]
        self.best_val_loss = state.get("best_val_loss")
        self.elapsed = state.get("elapsed_seconds", 0.0)
        self.skipped_steps = state.get("skipped_steps", 0)
        self.wandb_run = state.get("wandb_run")
        previous_iters = state["config"].get("train-iters")
        if previous_iters != self.config.train_iters:
            self.log(
                f"note: train-iters changed from {previous_iters} to {self.config.train_iters}"
            )
        self.config = schedule_on_resume(self.config, state["config"], self.log)
        self.log(f"resuming {self.run_dir.name} from {checkpoint.name} (step {self.step})")

    def _checkpoint_to_resume(self) -> tuple[Path, dict[str, Any]]:
        """The run's newest complete checkpoint and its state; one trained with another
        tokenizer, or none, is a NeoxlabError."""
        root = checkpoint_root(self.config, self.run_dir)
        checkpoint = latest_checkpoint(root) if root else None
        if checkpoint is None:
            raise NeoxlabError(
                f"run {self.run_dir} has no checkpoint to resume from",
                hint="start a new run (neoxlab train CONFIG, or --resume auto, which starts one "
                "when there is nothing to resume), or check the run's `save` folder",
            )
        # Same shapes do not mean the same tokens: a tokenizer of equal size would train on.
        if load_tokenizer(checkpoint).to_str() != self.data.tokenizer.to_str():
            raise NeoxlabError(
                f"{checkpoint} was trained with another tokenizer than {self.data.tokenizer_file}",
                hint=f"continue it with its own config (neoxlab train --resume {self.run_dir}), "
                "or start a new run under another --name",
            )
        state = read_state(checkpoint)
        if self.base_model is not None:
            check_base(state.get("base_model"), self.base_model, checkpoint)
        return checkpoint, state

    # ---- the loop -------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train from the current step to train-iters, or to the next exit-interval multiple."""
        loop = self._start()
        signals = StopOnSignal(self.world, self.runtime.device, loop.progress.write).install()
        ended = False  # the loop came to an end (or stopped the run itself): a summary is due
        try:
            while self.step < loop.end:
                loss, grad_norm = self._train_step(loop.model)
                self._count_step(loop)
                stop = signals.requested()  # a signal: this step is the last, logged and saved
                self._log_eval_save(loop, loss, grad_norm, last=self.step == loop.end or bool(stop))
                if stop:
                    self.stopped_by = signal.Signals(stop).name
                    break
            ended = True
        except NeoxlabError:
            ended = True  # diverged, or could not save: the run ends here, and says why
            raise
        except RuntimeError as error:
            if distributed.is_peer_failure(error, self.world):
                raise self._peer_failed(error) from None
            raise
        finally:
            signals.restore()
            self._finish(loop, ended)
        return TrainResult(
            self.run_dir,
            self.step,
            loop.train_loss,
            self.best_val_loss,
            loop.last_eval,
            finished=self.step >= self.config.train_iters,
            stopped_by=self.stopped_by,
        )

    def _start(self) -> _LoopState:
        """Set up: run files and tracker, the model the steps run (DDP, compiled), the evaluation
        at step 0 of a new run, the progress bar."""
        resumed = self.step > 0
        tracker = self._open_tracker(resumed)
        model = self.model
        if self.world.distributed and not self.sharded:
            model = distributed.wrap_ddp(model, self.runtime.device)
        model = self.runtime.compiled(model)
        end = self._end_step()
        trained = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        adapters = f" ({trained:,} trained: LoRA adapters)" if self.lora else ""
        self.log(
            f"run {self.run_dir} | {self.model.num_parameters():,} parameters{adapters} | "
            f"{self.runtime.describe()} | batch {self.global_batch} x "
            f"{self.config.seq_length} tokens ({self.accumulation} "
            f"micro-batch{'es' if self.accumulation != 1 else ''} of "
            f"{self.micro_batch})"
        )
        last_eval: dict[str, float] = {}
        if not resumed and self.step < end:
            last_eval = self._eval_and_log(tracker, progress=None)
        tokens_per_step = self.global_batch * self.config.seq_length
        progress = (
            Progress(end, self.step, tokens_per_step, enabled=self.show_progress)
            if self.world.is_main
            else _Silent()
        )
        self.model.train()
        return _LoopState(
            model,
            end,
            tracker,
            progress,
            flops_per_token=self.model.flops_per_token(self.config.seq_length),
            peak_flops=self.runtime.peak_flops(),
            last_eval=last_eval,
        )

    def _open_tracker(self, resumed: bool) -> Tracker | _Silent:
        if not self.world.is_main:
            return _Silent()
        self._write_run_files()
        tracker = Tracker(
            self.run_dir,
            resume_step=self.step if resumed else None,
            config=self.config,
            config_files=self.config_files,
            info=run_info(self.runtime, self.model.num_parameters(), self.data.summary),
            wandb_run=self.wandb_run,
            log=self.log,
        )
        self.wandb_run = tracker.wandb_run
        return tracker

    def _end_step(self) -> int:
        """The step this run stops after: train-iters, or the next multiple of exit-interval."""
        end, interval = self.config.train_iters, self.config.exit_interval
        if interval:
            # As gpt-neox: stop at the next multiple, so each resumed part trains that many steps.
            end = min(end, (self.step // interval + 1) * interval)
        return end

    def _train_step(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over `accumulation` micro-batches; returns (loss, grad norm).

        Nothing here waits for the GPU: loss and grad norm stay on the device, and the checks
        DESIGN asks for (non-finite loss, fp16 skipped steps) go through `self.health`, read at
        log, eval and save steps by `_check_health`."""
        set_lr(self.optimizer, lr_at(self.step, self.config))
        batch = self.train_sampler.batch(self.step, self.global_batch)
        loss_sum = torch.zeros((), device=self.runtime.device)
        rank, world_size = self.world.rank, self.world.world_size
        for index in range(self.accumulation):
            # Rank r of W takes micro-batches r, r + W, ...: the step's batch at any world size.
            first = (index * world_size + rank) * self.micro_batch
            micro = batch.rows(first, first + self.micro_batch).to(self.runtime.device)
            # Gradients are reduced across ranks once per step, after the last micro-batch.
            with distributed.gradient_sync(model, index == self.accumulation - 1):
                if self.runtime.cuda_graphs:
                    # a new step: outputs of earlier graph replays may be overwritten
                    torch.compiler.cudagraph_mark_step_begin()
                with self.runtime.autocast():
                    _, loss = model(micro.inputs, micro.targets, **micro.model_kwargs())
                self.scaler.scale(loss / self.accumulation).backward()
            loss_sum += loss.detach().float()
        # Every rank sees the same global loss (and grad norm), so all stop together.
        loss = distributed.mean_across_ranks(loss_sum / self.accumulation, self.world)
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_gradients(self.model.parameters(), self.config)
        self.scaler.step(self.optimizer)  # fused AdamW skips overflowed steps on the device
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.health.record(self.step + 1, loss, grad_norm, fp16=self.scaler.is_enabled())
        return loss, grad_norm

    def _count_step(self, loop: _LoopState) -> None:
        self.step += 1
        step_tokens = self.global_batch * self.config.seq_length
        self.tokens += step_tokens
        loop.window_tokens += step_tokens
        loop.progress.advance(lr_at(self.step - 1, self.config))

    def _log_eval_save(
        self, loop: _LoopState, loss: torch.Tensor, grad_norm: torch.Tensor, last: bool
    ) -> None:
        """Log, evaluate and checkpoint where this step is due for them; the `last` step of a run
        is always logged, and checkpointed when the run saves."""
        config = self.config
        logging = self.step % config.log_interval == 0 or self.step == 1 or last
        evaluating = self.step % config.eval_interval == 0 or self.step == config.train_iters
        saving = config.save and (self.step % config.save_interval == 0 or last)
        if logging or evaluating or saving:
            # The loop's only host sync: the time of this window then includes all the
            # GPU work queued before evaluation or checkpointing starts.
            self._check_health()
        if logging:
            self._log_train(loop, loss, grad_norm)
        if last:
            loop.progress.close()  # the final bar prints once, above what the end writes
        pause_start = time.perf_counter()
        if evaluating:
            loop.last_eval = self._eval_and_log(loop.tracker, loop.progress)
        if saving:
            loop.checkpoint = self.save()
            loop.progress.write(f"saved checkpoint {loop.checkpoint}")
        # Evaluation and checkpointing are not training time: keep them out of tokens/s.
        loop.window_start += time.perf_counter() - pause_start

    def _log_train(self, loop: _LoopState, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """The step's train/ metrics, with tokens/s over the steps since the last logged one."""
        loop.train_loss = float(loss)
        seconds = time.perf_counter() - loop.window_start
        self.elapsed += seconds
        tokens_per_second = loop.window_tokens / max(seconds, 1e-9)
        record = {
            "step": self.step,
            "tokens": self.tokens,
            "train/loss": loop.train_loss,
            "train/lr": lr_at(self.step - 1, self.config),
            "train/grad_norm": float(grad_norm),
            "train/tokens_per_second": tokens_per_second,
            "train/skipped_steps": self.skipped_steps,
        }
        if loop.peak_flops:
            # tokens/s counts every rank's tokens: divide by all ranks' peak
            record["train/mfu"] = model_flops_utilization(
                loop.flops_per_token, tokens_per_second, loop.peak_flops, self.world.world_size
            )
        loop.tracker.log(record)
        loop.progress.logged(loop.train_loss, tokens_per_second, record.get("train/mfu"))
        loop.window_start, loop.window_tokens = time.perf_counter(), 0

    def _eval_and_log(
        self, tracker: Tracker | _Silent, progress: Progress | _Silent | None
    ) -> dict[str, float]:
        result = self.evaluate()
        tracker.log(
            {
                "step": self.step,
                "tokens": self.tokens,
                "val/loss": result["loss"],
                "val/ppl": result["ppl"],
                "val/acc": result["acc"],
                **{f"val/{name}": result[name] for name in CODE_METRICS if name in result},
            }
        )
        write = progress.write if progress else self.log
        write(
            f"step {self.step}: val loss {result['loss']:.4f} | ppl {result['ppl']:.2f} | "
            f"acc {result['acc']:.3f}{format_code_metrics(result)}"
        )
        sample = self._sample()
        if sample is not None:
            tracker.log_sample(self.step, sample)
            write(f"--- sample at step {self.step} ---\n{sample}\n---")
        return result

    def _peer_failed(self, error: RuntimeError) -> NeoxlabError:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "no answer"
        return NeoxlabError(
            f"another process of this job failed during step {self.step + 1} ({first_line})",
            hint="its own error says why (torchrun names the failed rank); fix that, then "
            f"continue from the last checkpoint: neoxlab train --resume {self.run_dir}",
        )

    def _finish(self, loop: _LoopState, ended: bool) -> None:
        loop.progress.close()
        if not ended:
            loop.tracker.abandon()
            return
        summary = {
            "step": self.step,
            "tokens": self.tokens,
            "train/loss": loop.train_loss,
            "best_val_loss": self.best_val_loss,
            "train_seconds": self.elapsed,
        }
        loop.tracker.finish(summary, loop.checkpoint)

    # ---- what the phases call: checkpoints, evaluation, samples, health -------------------------

    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "best_val_loss": self.best_val_loss,
            "elapsed_seconds": self.elapsed,
            "skipped_steps": self.skipped_steps,
            "seed": self.config.seed,
            "config": self.config.to_dict(),
            "config_files": self.config_files,
            "neoxlab_version": __version__,
            "tokenizer_vocab_size": self.data.tokenizer.get_vocab_size(),
            "wandb_run": self.wandb_run,
            "base_model": self.base_model,  # LoRA: the model the adapters belong to
        }

    def save(self) -> Path | None:
        root = checkpoint_root(self.config, self.run_dir)
        if root is None:
            return None
        self._check_health()  # never write the weights of a diverged run
        # Every rank joins the gather; rank 0 writes the same folder a single process writes.
        weights, optimizer_state = distributed.full_state(
            self.model, self.optimizer, trainable_only=self.lora is not None
        )
        path = None
        if self.world.is_main:
            training_state = {
                "optimizer": optimizer_state,
                "scaler": self.scaler.state_dict(),
                "rng": _rng_state(self.runtime.device),
            }
            path = save_checkpoint(
                root,
                self.step,
                weights,
                training_state,
                self._state(),
                self.data.tokenizer_file,
                self.config.keep_last_n_checkpoints,
            )
        distributed.barrier(self.world)
        return path

    def evaluate(self) -> dict[str, float]:
        # Line completion generates on rank 0's view of the model: not with sharded weights.
        result = evaluate_run(
            self.model,
            self.val_sampler,
            self.data,
            self.config,
            self.micro_batch,
            self.runtime,
            generate=not self.sharded,
        )
        if self.best_val_loss is None or result["loss"] < self.best_val_loss:
            self.best_val_loss = result["loss"]
        return result

    def _sample(self) -> str | None:
        # Generation would need every rank in step with rank 0's sharded forward passes.
        if not self.config.sample_tokens or not self.world.is_main or self.sharded:
            return None
        return sample_text(
            self.model,
            self.data.tokenizer,
            self.config.sample_prompt,
            self.config.sample_tokens,
            self.data.eod_id,
            self.runtime.device,
            self.config.seed,
        )

    def _write_run_files(self) -> None:
        remove_temporaries(self.run_dir)  # left by a part of this run that was killed
        save_config(self.config, self.run_dir / "config.yml")
        save_tokenizer(
            self.data.tokenizer,
            self.run_dir,
            eod_token=self.config.eod_token,
            pad_token=self.config.pad_token,
            model_max_length=self.config.context_length,
        )

    def _check_health(self) -> None:
        """Count the skipped fp16 steps and stop at a diverged run: one host sync."""
        first_bad, loss, grad_norm, skipped = self.health.read()
        self.skipped_steps += skipped
        if first_bad >= 0:
            if math.isfinite(loss):
                self._diverged(first_bad, "the gradient norm became non-finite", grad_norm)
            else:
                self._diverged(first_bad, "the loss became non-finite", loss)
        if self.scaler.is_enabled():
            scale = self.scaler.get_scale()
            if scale < self.config.fp16["min_loss_scale"]:
                reason = "the fp16 loss scale fell below min-loss-scale"
                self._diverged(self.step, reason, scale)

    def _diverged(self, step: int, reason: str, value: float) -> None:
        root = checkpoint_root(self.config, self.run_dir)
        last = latest_checkpoint(root) if root else None
        where = f"last good checkpoint: {last}" if last else "no checkpoint was saved"
        raise NeoxlabError(
            f"training stopped at step {step}: {reason} ({value}); {where}",
            hint="lower lr, raise warmup or gradient-clipping, then resume or restart",
        )


def train(config: Config, **kwargs: Any) -> TrainResult:
    """Build a Trainer and run it (see Trainer for the keyword arguments). Running out of
    memory after all is a NeoxlabError that says what would fit."""
    try:
        return Trainer(config, **kwargs).run()
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        error = memory_error(err, config)
        if error is None:
            raise
        raise error from None
