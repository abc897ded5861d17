"""IPUTrainer: the `transformers.Trainer` interface (callbacks, logging, checkpoints, model card, metrics files) with
the IPU configuration's batch semantics and its own step loop.

- One optimizer step consumes a combined batch of micro_batch x gradient_accumulation_steps x replication_factor
  samples; `global_step` counts optimizer steps.
- `device_iterations` optimizer steps form a group that runs with no host read of a device value; losses and
  counters are read once per group, and logging, evaluation and saving happen at group boundaries (so at the first
  boundary at or after the step that asked for them). A group that ends with nothing to do is read only once the
  next group is launched, so that the device never waits for the host between groups.
- An epoch is a whole number of groups: an incomplete last group of an epoch is dropped, or completed with samples
  from the start of the epoch's order with --pad_on_batch_axis (real samples, so no batch is empty and no loss NaN).
- Evaluation keeps every sample and follows the inference factors (inference_device_iterations batches per read).
"""
import collections
import contextlib
import itertools
import logging
import math
import os
import pickle
import time
from dataclasses import dataclass

import datasets
import torch
from transformers import Trainer
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_pt_utils import nested_concat, nested_numpify
from transformers.trainer_utils import (PREFIX_CHECKPOINT_DIR, EvalLoopOutput, EvalPrediction, SaveStrategy,
                                        TrainOutput, denumpify_detensorize)

from .arguments import IPUTrainingArguments, load_ipu_config
from . import checkpoint as ckpt
from .backends import make_backend
from .compat import best_global_step, init_training_references
from .backends.base import DeviceSums, EvalSums, batch_size
from .errors import RunFailed, UserError, one_line
from .parallel import ParallelLayout
from .signals import StopRequest
from .pipeline.stages import build_stage_plan, describe_batch

logger = logging.getLogger("ipu_train")


@dataclass
class BatchLayout:
    micro_batch: int
    accumulation: int
    replicas: int
    device_iterations: int

    @property
    def step_samples(self):
        return self.micro_batch * self.accumulation * self.replicas

    @property
    def group_samples(self):
        return self.step_samples * self.device_iterations

    def steps_per_epoch(self, num_samples, pad):
        groups = -(-num_samples // self.group_samples) if pad else num_samples // self.group_samples
        return groups * self.device_iterations

    def epoch_order(self, num_samples, seed, pad, shuffle=True):
        """Global sample order of an epoch: a permutation drawn from (seed, epoch) alone, so that a resumed run
        rebuilds it without touching the data; cut (or completed) to a whole number of groups."""
        if shuffle:
            order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed)).tolist()
        else:
            order = list(range(num_samples))
        length = self.steps_per_epoch(num_samples, pad) * self.step_samples
        while len(order) < length:
            order += order[:length - len(order)]
        return order[:length]


@dataclass
class LoopState:
    """What the training loop carries from group to group, on the host."""
    loss: float = 0.0  # the run's step losses (finite ones), summed; a resumed run starts from its checkpoint's
    finite: float = 0.0  # the steps counted in `loss`
    steps: int = 0  # optimizer steps, samples, tokens and model FLOPs of this run (all processes)
    samples: int = 0
    tokens: int = 0
    flops: int = 0
    window_loss: float = 0.0  # the same since the last log
    window_finite: float = 0.0
    window_steps: int = 0
    stop_requested: bool = False  # by a signal, on some process; once asked, it stays asked
    diverged: bool = False  # too many non-finite losses in a row
    ends_nonfinite: bool = False  # the last step read had a non-finite loss

    def add_group(self, sums, steps, samples, tokens, flops):
        """A group's host values: its GroupSums and its counts over all processes."""
        self.stop_requested |= sums.stop_requested > 0
        self.diverged = sums.diverged > 0
        self.ends_nonfinite = sums.ends_nonfinite > 0
        self.steps += steps
        self.samples += samples
        self.tokens += tokens
        self.flops += flops
        self.loss += sums.loss
        self.finite += sums.finite_steps
        self.window_loss += sums.loss
        self.window_finite += sums.finite_steps
        self.window_steps += steps

    def take_window_loss(self):
        """The mean loss since the last log, then a new window. A window whose every loss was NaN/inf gives NaN:
        divergence shows, it is not filtered away."""
        mean = self.window_loss / self.window_finite if self.window_finite else float("nan")
        self.window_loss, self.window_finite, self.window_steps = 0.0, 0.0, 0
        return mean

    @property
    def mean_loss(self):
        return self.loss / self.finite if self.finite else float("nan")

    def totals(self):
        """What a checkpoint keeps, so that a resumed run's train_loss covers the whole run."""
        return {"loss": self.loss, "finite": self.finite}


class DeviceBatches:
    """The micro-batches of `batches`, in order, each moved to the device by `to_device` once. `prefetch(n)` reads and
    moves the next n ahead of need: on CUDA the trainer calls it once a group's steps are launched and before the
    group's host read, so that collating and copying the next group's first step overlaps the device's work instead
    of following the read."""

    def __init__(self, batches, to_device):
        self._batches = iter(batches)
        self._to_device = to_device
        self._ready = collections.deque()

    def __iter__(self):
        return self

    def __next__(self):
        if self._ready:
            return self._ready.popleft()
        return self._to_device(next(self._batches))

    def prefetch(self, n):
        while len(self._ready) < n:
            try:
                self._ready.append(self._to_device(next(self._batches)))
            except StopIteration:
                return


class ThroughputMeter:
    """Samples, tokens and FLOPs per second over the part of the run after the warm-up steps (and after the first
    group when compiling); time spent logging, evaluating and saving is left out."""

    def __init__(self, warmup_steps):
        self.warmup_steps = warmup_steps
        self.start = None
        self.paused = 0.0
        self.steps = self.samples = self.tokens = self.flops = 0

    def group_done(self, steps_this_run, steps, samples, tokens, flops):
        if self.start is None:
            if steps_this_run >= self.warmup_steps:
                self.start = time.perf_counter()
            return
        self.steps += steps
        self.samples += samples
        self.tokens += tokens
        self.flops += flops

    @property
    def started(self):
        return self.start is not None

    def pause(self, seconds):
        if self.start is not None:
            self.paused += seconds

    def metrics(self, run_seconds, run_counts):
        """`run_counts` (steps, samples, tokens, flops) and `run_seconds` of the whole run serve when the run ended
        before the warm-up did."""
        if self.start is None or self.steps == 0:
            logger.warning("The run was too short to leave out %d warm-up step(s): throughput covers the whole run",
                           self.warmup_steps)
            (steps, samples, tokens, flops), elapsed = run_counts, run_seconds
        else:
            steps, samples, tokens, flops = self.steps, self.samples, self.tokens, self.flops
            elapsed = time.perf_counter() - self.start - self.paused
        elapsed = max(elapsed, 1e-9)
        return {"train_samples_per_second": round(samples / elapsed, 3),
                "train_steps_per_second": round(steps / elapsed, 3),
                "train_tokens_per_second": round(tokens / elapsed, 3),
                "model_flops_per_second": flops / elapsed}


class IPUTrainer(Trainer):
    def __init__(self, model=None, ipu_config=None, args=None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_metrics=None, preprocess_logits_for_metrics=None,
                 callbacks=None, optimizers=(None, None), eval_data_collator=None, **kwargs):
        """transformers.Trainer's arguments plus `ipu_config` (default: load_ipu_config(args)) and
        `eval_data_collator` (default: data_collator) for evaluation and prediction batches."""
        args = args if args is not None else IPUTrainingArguments(output_dir="tmp_trainer")
        if not isinstance(args, IPUTrainingArguments):
            raise TypeError(f"IPUTrainer needs IPUTrainingArguments, got {type(args).__name__}")
        if ipu_config is None:
            ipu_config = load_ipu_config(args)
        self.layout = ParallelLayout.build(ipu_config, args)
        self.ipu_config = ipu_config
        try:  # transformers checks the arguments here (e.g. save_strategy "best" needs --metric_for_best_model)
            super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, processing_class=processing_class,
                             compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
                             preprocess_logits_for_metrics=preprocess_logits_for_metrics, **kwargs)
        except ValueError as err:
            raise UserError(one_line(err)) from None
        self.eval_data_collator = eval_data_collator if eval_data_collator is not None else self.data_collator
        self._set_signature_columns_if_needed()  # from the model's own forward, before any patch of it
        for collator in (self.data_collator, self.eval_data_collator):  # columns a collator reads, the model not
            self._signature_columns += [name for name in getattr(collator, "consumed_columns", ())
                                        if name not in self._signature_columns]
        self.backend = make_backend(args, ipu_config, self.layout)
        # Read the next group's first step ahead of each group's host read (see _prefetch_allowed).
        self.read_ahead = args.device_type == "cuda"
        # Read a quiet group's sums after launching the next group (see _training_loop).
        self.defer_quiet_reads = True
        unused = ipu_config.unused_on_pytorch() if args.device_type != "ipu" else []
        if unused:
            logger.info("IPU configuration fields with no effect on %s: %s", args.device_type, ", ".join(unused))

    def _move_model_to_device(self, model, device):
        """Stages across processes: only this process's stage modules go to the device (PipelinedBackend)."""
        if not self.layout.pipelined:
            super()._move_model_to_device(model, device)

    # --- optimizer ---------------------------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            # Stages across processes: this process's stages, not the whole model (which stays for saving).
            owner = self.model_wrapped if self.layout.pipelined else self.model
            decay = set(self.get_decay_parameter_names(owner))
            named = [(n, p) for n, p in owner.named_parameters() if p.requires_grad]
            groups = [{"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                      {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
            self.optimizer = self.backend.create_optimizer([g for g in groups if g["params"]])
        return self.optimizer

    # --- training ------------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None):
        """Train; returns TrainOutput(global_step, training_loss, metrics) as transformers.Trainer does."""
        args, cfg = self.args, self.ipu_config.train()
        checkpoint = self._resolve_checkpoint(resume_from_checkpoint)
        self._memory_tracker.start()
        self.is_in_train = True
        dataset = self._training_dataset()
        layout = BatchLayout(args.per_device_train_batch_size, self.layout.accumulation, self.layout.replicas,
                             cfg.device_iterations)
        if _is_stream(dataset):
            if args.max_steps <= 0:
                raise UserError("a streamed training set has no length: pass --max_steps")
            if args.device_type == "ipu":
                raise UserError("--streaming is not supported with --device ipu: drop --streaming")
        num_samples = None if _is_stream(dataset) else len(dataset)
        # A stream is read as one long epoch of max_steps optimizer steps (passes over it restart as needed).
        steps_per_epoch = args.max_steps if num_samples is None else layout.steps_per_epoch(num_samples,
                                                                                           args.pad_on_batch_axis)
        if steps_per_epoch == 0:
            raise UserError(
                f"the training set has {num_samples} samples, fewer than one combined batch of {layout.group_samples} "
                f"(micro batch x gradient accumulation x replicas x device iterations): lower one of them, add data, "
                f"or pass --pad_on_batch_axis")
        max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
        num_epochs = math.ceil(max_steps / steps_per_epoch)

        geometry = self._geometry(layout, num_samples)
        self._model_signature = ckpt.model_signature(getattr(self.model, "config", None))  # before any patch
        manifest = None
        if checkpoint is not None:
            manifest = ckpt.check_resumable(checkpoint, self._model_signature, geometry, args.ignore_data_skip)
            if manifest["step"] >= max_steps:
                raise UserError(f"{checkpoint} is at step {manifest['step']}, and this run ends at step {max_steps}: "
                                "nothing is left to train. Raise --max_steps (or --num_train_epochs), or pass "
                                "--overwrite_output_dir to start afresh")
            with _loading(checkpoint):
                if self.layout.pipelined:  # each process will read its stage's weights from the checkpoint
                    self.backend.resume_weights(self.model, checkpoint)
                else:
                    self._load_from_checkpoint(checkpoint)  # weights, before compilation and DDP wrap the model
        # A collator that caps masked tokens at a fixed count lets the sparse MLM head gather with static shapes.
        cap = getattr(self.data_collator, "max_masked_tokens", None)
        self.model_wrapped = self.backend.prepare_model(self.model,
                                                        max_predictions=cap if isinstance(cap, int) else None)
        self.create_optimizer()
        self.create_scheduler(num_training_steps=max_steps, optimizer=self.optimizer)
        self._init_state(max_steps, num_epochs, layout, trial, checkpoint)
        if checkpoint is not None:
            with _loading(checkpoint):
                self._load_optimizer_and_scheduler(checkpoint)
                self.backend.load_state(checkpoint)
        self._geometry_saved, self._resumed_from = geometry, checkpoint
        # The run's training loss covers the steps before a resume too.
        self._loop = LoopState(**manifest["train_loss_totals"]) if manifest else LoopState()
        self.backend.attach(self.optimizer, self.lr_scheduler)
        for attr in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, attr, getattr(self, attr))
        self._log_training_plan(layout, num_samples, steps_per_epoch, max_steps)

        if args.compile_only:
            return self._compile_only(dataset, layout)
        self.stopped_by_signal = None  # the signal that stopped the run, agreed by every process
        with StopRequest() as stop:
            return self._training_loop(dataset, layout, steps_per_epoch, checkpoint, trial, ignore_keys_for_eval,
                                       stop)

    def _resolve_checkpoint(self, resume_from_checkpoint):
        """A checkpoint named by the caller must be complete; True: the newest complete one in output_dir."""
        if resume_from_checkpoint is True:
            last, _ = ckpt.newest_complete(self.args.output_dir)
            if last is None:
                raise UserError(f"--resume_from_checkpoint: no complete checkpoint-N in {self.args.output_dir}: pass "
                                "a checkpoint directory or train from the start")
            return ckpt.agree(last)
        if resume_from_checkpoint in (None, False):
            return None
        return ckpt.require_complete(resume_from_checkpoint)

    def _geometry(self, layout, num_samples):
        """What a checkpoint's data position is counted in (optimizer steps of this batch layout, epochs of this many
        samples): a resume must have the same."""
        return {"micro_batch": layout.micro_batch, "accumulation": layout.accumulation, "replicas": layout.replicas,
                "device_iterations": layout.device_iterations, "processes": self.layout.processes,
                "train_samples": num_samples, "pad_on_batch_axis": bool(self.args.pad_on_batch_axis),
                **self._pipeline_geometry()}

    def _pipeline_geometry(self):
        """Stages across processes: which process holds which weights and optimizer state (absent otherwise, so that
        the checkpoints of other runs keep their geometry)."""
        layout = self.layout
        if not layout.pipelined:
            return {}
        return {"pipeline": {"stages": layout.pipeline_stages, "processes_per_replica": layout.pipeline_processes,
                             "schedule": self.args.pipeline_schedule}}

    def _training_dataset(self):
        if self.train_dataset is None:
            raise UserError("IPUTrainer.train() needs a train_dataset")
        return self._without_unused_columns(self.train_dataset, "training")

    def _train_batches(self, dataset, layout, epoch, start_step):
        """This replica's micro-batches for an epoch, from `start_step` on."""
        args = self.args
        collator = self._collator(self.train_dataset, "training", self.data_collator)
        if _is_stream(dataset):
            return self._stream_micro_batches(dataset, collator, layout, start_step)
        order = layout.epoch_order(len(dataset), (args.data_seed or args.seed) + epoch, args.pad_on_batch_axis,
                                   shuffle=args.train_sampling_strategy != "sequential")
        return iter(self.backend.train_loader(dataset, collator, order, start_step, args.seed + epoch))

    def _stream_micro_batches(self, dataset, collator, layout, start_step):
        """Micro-batches of this replica from a stream, pass after pass: rows are cut into combined batches (an
        incomplete last one is dropped) and each replica collates its slice. A stream only reads forward, so a
        resumed run reads past the rows of the steps already trained (without collating them)."""
        rank, micro = self.layout.data_rank, layout.micro_batch
        micro_batches = self.layout.micro_batches_per_step
        per_process = micro * micro_batches
        to_skip = start_step * layout.step_samples
        for stream_epoch in itertools.count():
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(stream_epoch)
            combined, full_batches = [], 0
            for row in dataset:
                if to_skip:
                    to_skip -= 1
                    continue
                combined.append(row)
                if len(combined) == layout.step_samples:
                    mine = combined[rank * per_process:(rank + 1) * per_process]
                    for k in range(micro_batches):
                        yield collator(mine[k * micro:(k + 1) * micro])
                    combined, full_batches = [], full_batches + 1
            if full_batches == 0 and not to_skip:
                raise UserError(f"the training stream holds fewer than one combined batch of {layout.step_samples} "
                                "samples: lower --per_device_train_batch_size or --gradient_accumulation_steps")

    def _without_unused_columns(self, dataset, description):
        if isinstance(dataset, datasets.Dataset):
            return self._remove_unused_columns(dataset, description=description)
        return dataset

    def _collator(self, dataset, description, collator):
        if isinstance(dataset, datasets.Dataset):
            return collator  # its unused columns are removed from the dataset itself
        return self._get_collator_with_removed_columns(collator, description=description)

    def _init_state(self, max_steps, num_epochs, layout, trial, checkpoint):
        stateful = [cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)]
        self.state = TrainerState(stateful_callbacks=stateful)
        self.state.is_hyper_param_search = trial is not None
        self.state.train_batch_size = layout.step_samples
        self.state.compute_steps(self.args, max_steps)
        if checkpoint is not None:
            with _loading(checkpoint):
                self.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
                self._load_callback_state()
            self.state.compute_steps(self.args, max_steps)  # this run's --logging/eval/save_steps, not the saved ones
        init_training_references(self.state, self, max_steps, num_epochs, trial)

    def _log_training_plan(self, layout, num_samples, steps_per_epoch, max_steps):
        cfg, args = self.ipu_config, self.args
        logger.info("***** Running training *****")
        logger.info("  Num examples = %s, optimizer steps per epoch = %d, total optimizer steps = %d",
                    "streamed" if num_samples is None else f"{num_samples:,}", steps_per_epoch, max_steps)
        logger.info("  %s", describe_batch(cfg, args.per_device_train_batch_size, args.per_device_eval_batch_size))
        logger.info("  Device %s, precision %s, %d process(es)", self.backend.device, args.precision,
                    self.layout.processes)
        logger.info("  %s", build_stage_plan(self.model, cfg).describe())
        if self.layout.pipelined:
            logger.info("  The %d pipeline stages of each replica run on %d processes (%s schedule), %d replica(s)",
                        cfg.ipus_per_replica, self.layout.pipeline_processes, args.pipeline_schedule,
                        self.layout.replicas)
        elif cfg.ipus_per_replica > 1 and args.device_type != "ipu":
            logger.info("  The %d pipeline stages of each replica all run on its one device (%s)",
                        cfg.ipus_per_replica, self.backend.device)

    def _training_loop(self, dataset, layout, steps_per_epoch, checkpoint, trial, ignore_keys_for_eval, stop):
        args, state, loop = self.args, self.state, self._loop
        start_time = time.time()
        self._initial_num_input_tokens_seen = state.num_input_tokens_seen
        # Compilation happens in the first group; CUDA graphs are recorded in the second (the first runs warm-up).
        compile_groups = (2 if args.cuda_graphs else 1) if args.torch_compile else 0
        meter = ThroughputMeter(args.throughput_warmup_steps + compile_groups * layout.device_iterations)
        self._clear_earlier_runs(self._get_output_dir(trial=trial))
        self.control = self.callback_handler.on_train_begin(args, state, self.control)
        if args.eval_on_start:
            self._evaluate(trial, ignore_keys_for_eval, skip_scheduler=True)

        epochs_trained = state.global_step // steps_per_epoch
        rng_pending = checkpoint
        for epoch in range(epochs_trained, state.num_train_epochs):
            done = state.global_step - epoch * steps_per_epoch if epoch == epochs_trained else 0
            batches = DeviceBatches(self._train_batches(dataset, layout, epoch, 0 if args.ignore_data_skip else done),
                                    self.backend.to_device)
            if rng_pending is not None:
                with _loading(rng_pending):
                    self._load_rng_state(rng_pending)  # after the loader exists: dropout and masking resume exactly
                rng_pending = None
            self.control = self.callback_handler.on_epoch_begin(args, state, self.control)
            unread = None  # a quiet group whose sums are read once the next group is launched
            while done < steps_per_epoch and state.global_step < state.max_steps:
                n_steps = min(layout.device_iterations, steps_per_epoch - done, state.max_steps - state.global_step)
                result, asked = self._run_group(batches, n_steps, epoch, done, steps_per_epoch, stop)
                done += result.steps
                goes_on = self._group_follows(done, steps_per_epoch)
                if self._prefetch_allowed(asked, goes_on):
                    batches.prefetch(layout.accumulation)
                if unread is not None:
                    self._read_group(unread, meter)  # host sync: the previous, quiet group's sums
                    self._stop_if_diverged()
                    unread = None
                # Nothing to log, evaluate or save: the next group need not wait for this read. Not before the
                # throughput clock starts, which it does when the group that ends the warm-up is read.
                if self.defer_quiet_reads and meter.started and goes_on and not asked and not loop.stop_requested:
                    unread = result
                    continue
                grad_norm = self._read_group(result, meter)  # host sync: this group's sums
                self._stop_if_diverged()
                if loop.stop_requested and state.global_step < state.max_steps:
                    # A signal: every process saves here and stops (a run already at its end just ends).
                    self.stopped_by_signal = self._agreed_signal(stop.signal_number)
                    asked.add("should_save")
                    self.control.should_training_stop = True
                paused = time.perf_counter()
                self._maybe_log_save_evaluate(asked, grad_norm, trial, ignore_keys_for_eval, start_time)
                meter.pause(time.perf_counter() - paused)
                if self.control.should_epoch_stop or self.control.should_training_stop:
                    break
            if self.stopped_by_signal is not None:  # saved: no end-of-epoch evaluation or save before exiting
                break
            self.control = self.callback_handler.on_epoch_end(args, state, self.control)
            self._maybe_log_save_evaluate({key for key in _ACTIONS if getattr(self.control, key)}, None, trial,
                                          ignore_keys_for_eval, start_time)
            if self.control.should_training_stop:
                break
        if loop.ends_nonfinite:
            self._refuse_nonfinite("the loss of the last step was NaN or inf")
        return self._finalize_training(start_time, meter)

    def _run_group(self, batches, n_steps, epoch, done, steps_per_epoch, stop):
        """Run one group of up to `n_steps` optimizer steps with no host read; the callbacks see every step, and
        what they ask for (log, evaluate, save) is gathered, to be acted on at the group's end. Returns the group's
        result (its sums on their way to the host) and the actions asked for."""
        args, state = self.args, self.state
        asked = set()
        group = self.backend.new_group()
        for step in range(1, n_steps + 1):
            self.control = self.callback_handler.on_step_begin(args, state, self.control)
            group.step(batches)
            state.global_step += 1
            state.epoch = epoch + (done + step) / steps_per_epoch
            self.control = self.callback_handler.on_step_end(args, state, self.control)
            asked.update(key for key in _ACTIONS if getattr(self.control, key))
            if self.control.should_epoch_stop or self.control.should_training_stop:
                break
        return group.finish(stop.requested), asked

    def _read_group(self, result, meter):
        """The group's one host read: its sums join the loop's totals, its logging window and the throughput meter.
        Returns the gradient norm to log, or None."""
        sums = self.backend.read(result.sums)
        processes = self.layout.processes
        # The processes of one pipeline read the same samples; each reports its share of the FLOPs.
        counts = (result.steps, result.samples * self.layout.data_processes, int(sums.tokens),
                  result.flops * processes)
        self._loop.add_group(sums, *counts)
        self.state.num_input_tokens_seen += int(sums.tokens)
        self.current_flos += result.flops
        meter.group_done(self._loop.steps, *counts)
        reported = self.args.max_grad_norm and self.backend.reports_grad_norm
        return sums.grad_norm / processes if reported else None

    def _stop_if_diverged(self):
        """Too many non-finite losses in a row: stop with one line, before any NaN weights are saved."""
        if self._loop.diverged:
            self._refuse_nonfinite(f"the loss was NaN or inf for {self.args.max_consecutive_nonfinite_steps} "
                                   "optimizer steps in a row")

    def _refuse_nonfinite(self, what):
        last, _ = ckpt.newest_complete(self.args.output_dir)
        kept = f"the last finite checkpoint, {last}, is kept" if last else "no checkpoint was saved"
        raise RunFailed(
            f"training diverged: {what}, by step {self.state.global_step} (learning rate "
            f"{self.backend.last_learning_rate:.3g}); {kept} and no final model is written. Lower --learning_rate "
            "(or raise --warmup_steps, set --max_grad_norm), then rerun; --max_consecutive_nonfinite_steps 0 never "
            "stops early")

    def _agreed_signal(self, number):
        """The signal number every process reports (only the processes that received one know it)."""
        return int(self.layout.largest_over_processes(number or 0, self.args.device))

    def _group_follows(self, done, steps_per_epoch):
        """Whether another group of this epoch follows the one just run."""
        control = self.control
        return (done < steps_per_epoch and self.state.global_step < self.state.max_steps
                and not (control.should_epoch_stop or control.should_training_stop))

    def _prefetch_allowed(self, asked, group_follows):
        """The next group's first step may be read ahead when this group ends with nothing but logging: the host
        random state that a checkpoint saves, or that an evaluation's collator draws from, is then the one of a run
        without read-ahead, so a resumed run stays exact. It is on with CUDA only (`read_ahead`): there the host
        random state serves the collator alone (dropout draws on the device) and the copies are asynchronous; on the
        CPU every copy is synchronous anyway, and dropout shares that state with the collator."""
        return self.read_ahead and group_follows and not asked & {"should_save", "should_evaluate"}

    def _maybe_log_save_evaluate(self, asked, grad_norm, trial, ignore_keys_for_eval, start_time):
        """Log, evaluate and save (the actions `asked` for) at a group boundary, as transformers.Trainer does after a
        step."""
        loop = self._loop
        for key in _ACTIONS:
            setattr(self.control, key, key in asked)
        if self.control.should_log and loop.window_steps > 0:
            logs = {"loss": loop.take_window_loss()}
            if grad_norm is not None:
                logs["grad_norm"] = grad_norm
            logs["learning_rate"] = self.backend.last_learning_rate  # the rate of the group's last step
            self.store_flos()
            self.log(logs, start_time)
        if self.control.should_evaluate:
            metrics = self._evaluate(trial, ignore_keys_for_eval)
            is_new_best = self._determine_best_metric(metrics=metrics, trial=trial)
            if self.args.save_strategy == "best":  # a stop asked by a signal still saves
                self.control.should_save = is_new_best or self.stopped_by_signal is not None
        if self.control.should_save:
            self._save_checkpoint(self.model_wrapped, trial)
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)
        for key in _ACTIONS:
            setattr(self.control, key, False)

    def _finalize_training(self, start_time, meter):
        # This name (transformers.Trainer's) is one that the memory tracker accepts as the caller of its
        # stop_and_update_metrics: --skip_memory_metrics false works.
        loop = self._loop
        runtime = time.time() - start_time
        throughput = meter.metrics(runtime, (loop.steps, loop.samples, loop.tokens, loop.flops))
        model_flops = throughput.pop("model_flops_per_second")
        metrics = {"train_runtime": round(runtime, 4), **throughput}
        peak = self.backend.peak_flops_per_second()
        if self.backend.device.type == "cuda":
            metrics["train_model_flops_per_second"] = model_flops
            if peak is not None:
                metrics["train_mfu"] = model_flops / (peak * self.layout.processes)
        self.store_flos()
        metrics["total_flos"] = self.state.total_flos
        metrics["train_loss"] = loop.mean_loss
        self._memory_tracker.stop_and_update_metrics(metrics)
        self.log(metrics)
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            if self.layout.pipelined:  # into the stages, whose weights are saved at the end
                logger.info("Loading best model from %s (score: %s).", self.state.best_model_checkpoint,
                            self.state.best_metric)
                self.backend.load_weights_into_stages(self.state.best_model_checkpoint)
            else:
                self._load_best_model()
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        self.is_in_train = False
        return TrainOutput(self.state.global_step, loop.mean_loss, metrics)

    def _compile_only(self, dataset, layout):
        """--compile_only: compile the training step on its first micro-batches (forward and backward; the weights
        do not change), then stop."""
        if not self.args.torch_compile:
            self.backend.compile(self.model)
        loader = self._train_batches(dataset, layout, epoch=0, start_step=0)
        started = time.perf_counter()
        self.backend.compile_step(loader)  # it reads the batches of one step
        metrics = {"compile_time": round(time.perf_counter() - started, 3)}
        logger.info("--compile_only: compiled in %.1f s; exiting without training", metrics["compile_time"])
        self.is_in_train = False
        return TrainOutput(self.state.global_step, 0.0, metrics)

    # --- evaluation ----------------------------------------------------------------------------------------------

    def get_eval_dataloader(self, eval_dataset=None):
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise UserError("evaluation needs an eval_dataset")
        return self._inference_loader(dataset, "evaluation")

    def get_test_dataloader(self, test_dataset):
        return self._inference_loader(test_dataset, "test")

    def _inference_loader(self, dataset, description):
        """This process's share of the samples, each exactly once: a contiguous block of a map-style dataset (so
        the shares concatenate in dataset order; their sizes differ by one at most), every processes-th
        micro-batch of a stream. The processes of one replica's pipeline stages read the same share."""
        collator = self._collator(dataset, description, self.eval_data_collator)
        dataset = self._without_unused_columns(dataset, description)
        world, rank, micro = self.layout.data_processes, self.layout.data_rank, self.args.per_device_eval_batch_size
        if _is_stream(dataset):
            if self.layout.pipelined:
                raise UserError(f"--pipeline_stages_across_processes: {description} of a streamed dataset does not "
                                "run through the stages yet: evaluate a dataset read whole (drop --streaming)")
            return (collator(rows) for i, rows in enumerate(_chunked(dataset, micro)) if i % world == rank)
        base, extra = divmod(len(dataset), world)
        first = rank * base + min(rank, extra)
        return self.backend.eval_loader(dataset, collator, list(range(first, first + base + (rank < extra))),
                                        self.label_names)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """Loss summed on the device and read once at the end; predictions (only when metrics need them) moved to
        the host once per inference_device_iterations batches."""
        args, cfg = self.args, self.ipu_config
        prediction_loss_only = args.prediction_loss_only if prediction_loss_only is None else prediction_loss_only
        ignore_keys = ignore_keys or getattr(getattr(self.model, "config", None), "keys_to_ignore_at_inference", [])
        model = self.model
        model.eval()
        self._log_evaluation_plan(dataloader, description)
        self.callback_handler.eval_dataloader = dataloader  # the length of transformers' progress bar
        sums = DeviceSums(EvalSums, self.backend.device)
        host_preds = host_labels = None
        group_preds, group_labels = [], []
        batch_metrics, metrics_finished = {}, False
        with cfg.in_mode("inference"):  # back to the previous mode on exit, errors included
            for inputs, last in _with_last(dataloader):
                inputs = self.backend.to_device(inputs)
                outputs, inputs = self.backend.eval_outputs(model, inputs)
                labels = _labels(inputs, self.label_names)
                size = batch_size(inputs)
                sums.add("samples", size)
                if isinstance(outputs, dict) and outputs.get("loss") is not None:
                    sums.add("loss", outputs["loss"].float() * size)
                    sums.add("counted", size)
                # transformers' ProgressCallback draws the bar (main process, unless --disable_tqdm); evaluate()
                # ends it.
                self.control = self.callback_handler.on_prediction_step(args, self.state, self.control)
                if prediction_loss_only:
                    continue
                logits = _logits(outputs, ignore_keys)
                if self.preprocess_logits_for_metrics is not None and logits is not None:
                    logits = self.preprocess_logits_for_metrics(logits, labels)
                if args.batch_eval_metrics:
                    if self.compute_metrics is not None:
                        batch_metrics = self.compute_metrics(EvalPrediction(predictions=logits, label_ids=labels),
                                                             compute_result=last)
                        metrics_finished = last
                    continue
                group_preds.append(logits)
                group_labels.append(labels)
                if len(group_preds) == cfg.inference_device_iterations or last:
                    host_preds = _append(host_preds, group_preds)
                    host_labels = _append(host_labels, group_labels)
                    group_preds, group_labels = [], []
        if args.batch_eval_metrics and self.compute_metrics is not None and not (prediction_loss_only
                                                                                 or metrics_finished):
            # A process with nothing to evaluate (fewer samples than processes) still finishes the metric, which
            # may reduce over all processes.
            nothing = torch.zeros(0, device=self.backend.device)
            batch_metrics = self.compute_metrics(EvalPrediction(predictions=nothing, label_ids=nothing),
                                                 compute_result=True)

        totals = self.backend.read(self.backend.to_host(sums))  # host sync: the evaluation's one read
        metrics = {}
        if not prediction_loss_only and not args.batch_eval_metrics:
            host_preds, host_labels = self._gather(host_preds), self._gather(host_labels)
            if self.compute_metrics is not None and host_preds is not None and host_labels is not None:
                metrics = self.compute_metrics(EvalPrediction(predictions=host_preds, label_ids=host_labels))
        elif args.batch_eval_metrics:
            metrics = batch_metrics or {}
        metrics = denumpify_detensorize(metrics)
        if totals.counted:
            metrics["loss"] = totals.loss / totals.counted
        metrics = {k if k.startswith(f"{metric_key_prefix}_") else f"{metric_key_prefix}_{k}": v
                   for k, v in metrics.items()}
        return EvalLoopOutput(predictions=host_preds, label_ids=host_labels, metrics=metrics,
                              num_samples=int(totals.samples))

    def _log_evaluation_plan(self, dataloader, description):
        """transformers' evaluation header, in its words: the samples of all processes, the micro-batch size."""
        num_examples = _num_examples(dataloader)
        logger.info("***** Running %s *****", description)
        if num_examples is None:
            logger.info("  Num examples: Unknown")
        else:
            logger.info("  Num examples = %d", num_examples)
        logger.info("  Batch size = %d", self.args.per_device_eval_batch_size)

    def _gather(self, arrays):
        """Concatenate every process's share in process order, which is the dataset order."""
        if arrays is None or not self.layout.distributed:
            return arrays
        result = None
        for share in self.layout.gather_objects(arrays):
            if share is not None:
                result = share if result is None else nested_concat(result, share, padding_index=-100)
        return result

    # --- saving --------------------------------------------------------------------------------------------------

    def save_model(self, output_dir=None, _internal_call=False):
        """Model (safetensors, loadable with from_pretrained), tokenizer, training_args.bin and ipu_config.json. With
        stages across processes, every process first sends its stages' weights to the main process's model."""
        if self.layout.pipelined and self.backend.pipeline is not None:
            self.backend.gather_model()
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.layout.writes_files:
            self.ipu_config.save_pretrained(output_dir if output_dir is not None else self.args.output_dir)

    def _save_checkpoint(self, model, trial):
        """`checkpoint-N`, complete or not at all (see checkpoint.py): every process writes its files into a staging
        folder; once all have, the main process gives it its manifest and renames it into place. A failed write (a
        full disk) removes the staging folder, leaves every earlier checkpoint as it was, and stops the run (exit
        code 1) on every process. Weights that follow a non-finite loss are not saved: the last finite checkpoint
        stays the newest."""
        args, step = self.args, self.state.global_step
        if self._loop.ends_nonfinite:
            logger.warning("Not saving checkpoint-%d: the loss of its last step was NaN or inf, so its weights may be "
                           "too; the last finite checkpoint stays the newest", step)
            return
        run_dir = self._get_output_dir(trial=trial)
        final = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        staging = ckpt.staging_path(final)
        self._agree_on_save(step, run_dir, staging, lambda: self._write_checkpoint(staging, run_dir, step))
        self._agree_on_save(step, run_dir, staging, lambda: self._publish(staging, final, step))
        if self.layout.writes_files:
            ckpt.rotate(run_dir, args.save_total_limit, keep=(final, self.state.best_model_checkpoint))
        if args.push_to_hub:
            self._push_from_checkpoint(final)

    def _agree_on_save(self, step, run_dir, staging, write):
        """Run this process's part of a save; if it failed on any process, every process stops with one line."""
        failure = None
        try:
            write()
        except Exception as err:  # a full disk shows as OSError, torch's RuntimeError or safetensors' own error
            failure = err
        if not self._any_process(failure is not None):
            return
        if self.layout.writes_files:
            ckpt.remove(staging)
        previous, _ = ckpt.newest_complete(run_dir)
        reason = one_line(failure, 200) if failure is not None else "another process failed to write"
        raise RunFailed(f"saving checkpoint-{step} in {run_dir} failed ({reason}); the partial checkpoint was removed "
                        f"and {previous or 'no earlier checkpoint'} is untouched. Free space (or fix the folder), then "
                        "rerun the same command to resume")

    def _publish(self, staging, final, step):
        if self.layout.writes_files:
            ckpt.write_manifest(staging, step, self._model_signature, self._geometry_saved, self._loop.totals(),
                                resumable=not self.args.save_only_model)
            ckpt.publish(staging, final)

    def _write_checkpoint(self, folder, run_dir, step):
        """Every file of a checkpoint but its manifest: the model, optimizer, scheduler, scaler, each process's RNG
        state and the trainer state, as transformers.Trainer writes them."""
        args = self.args
        self.store_flos()
        self.save_model(folder, _internal_call=True)
        best_step = best_global_step(self.state)
        if args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) and best_step:
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best_step}")
            if best_step == step or os.path.exists(best):
                self.state.best_model_checkpoint = best
        if not args.save_only_model:
            self._save_optimizer_and_scheduler(folder)
            self.backend.save_state(folder)
            self._save_rng_state(folder)
        if self.layout.writes_files:
            for callback in self.callback_handler.callbacks + [self.control]:
                if isinstance(callback, ExportableState):
                    name = callback.__class__.__name__
                    if isinstance(self.state.stateful_callbacks[name], list):
                        self.state.stateful_callbacks[name].append(callback.state())
                    else:
                        self.state.stateful_callbacks[name] = callback.state()
            self.state.save_to_json(os.path.join(folder, "trainer_state.json"))

    def _clear_earlier_runs(self, run_dir):
        """Before the first step: staging folders of saves that never finished go, and with --overwrite_output_dir
        the checkpoints of earlier runs too (the one resumed from stays), so that a later resume can never pick up
        another run's work, even when this one stops before its first save."""
        if self.layout.writes_files:
            for folder in ckpt.leftover_staging(run_dir):
                ckpt.remove(folder)
        if getattr(self.args, "overwrite_output_dir", False) and self.layout.writes_files:
            resumed = os.path.abspath(self._resumed_from) if self._resumed_from else None
            earlier = [f for f in ckpt.checkpoints_in(run_dir) if os.path.abspath(f) != resumed]
            if earlier:
                logger.info("--overwrite_output_dir: removing %d checkpoint(s) of an earlier run from %s: %s",
                            len(earlier), run_dir, ", ".join(os.path.basename(f) for f in earlier))
            for folder in earlier:
                ckpt.remove(folder)
        self.layout.barrier()

    def _any_process(self, flag):
        """Whether `flag` holds on any process."""
        return self.layout.largest_over_processes(float(flag), self.args.device) > 0

    def _save_optimizer_and_scheduler(self, output_dir):
        # A sharded optimizer (replicated_tensor_sharding) gathers its state on the main process first, with every
        # process taking part; the checkpoint then holds the whole state and loads into any number of replicas.
        if hasattr(self.optimizer, "consolidate_state_dict"):  # torch's ZeroRedundancyOptimizer
            self.optimizer.consolidate_state_dict(to=0)
        if self.layout.pipelined:  # each process's optimizer steps its own stages
            self.backend.save_optimizer(output_dir)
            return
        super()._save_optimizer_and_scheduler(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if self.layout.pipelined and checkpoint is not None:
            self.backend.load_optimizer(checkpoint, self.optimizer, self.lr_scheduler)
            return
        super()._load_optimizer_and_scheduler(checkpoint)


_ACTIONS = ("should_log", "should_evaluate", "should_save")


@contextlib.contextmanager
def _loading(checkpoint):
    """A checkpoint whose files cannot be read (corrupt, or of another kind) is named in one line."""
    try:
        yield
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as err:
        reason = one_line(err, 300)
        raise UserError(f"checkpoint {checkpoint} cannot be loaded: {reason}") from None


def _is_stream(dataset):
    return isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__")


def _num_examples(dataloader):
    """The samples an evaluation covers over all processes; None for a stream. A process's loader holds the whole
    dataset and reads its share by index (PyTorch), or holds the share as a Subset of it (PopTorch)."""
    dataset = getattr(dataloader, "dataset", None)
    if isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return None if dataset is None or _is_stream(dataset) else len(dataset)


def _chunked(rows, size):
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _with_last(iterable):
    """(item, is_last) pairs: the last batch is known when it arrives, even for a stream."""
    iterator = iter(iterable)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for following in iterator:
        yield current, False
        current = following
    yield current, True


def _labels(inputs, label_names):
    found = [inputs.get(name) for name in label_names]
    if not found or any(v is None for v in found):
        return None
    return found[0] if len(found) == 1 else tuple(found)


def _logits(outputs, ignore_keys):
    if isinstance(outputs, dict):
        values = tuple(v for k, v in outputs.items() if k not in list(ignore_keys) + ["loss"] and v is not None)
    else:
        values = tuple(outputs[1:])
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def _append(host, group):
    """Move a group of per-batch tensors to the host at once and append them (padded with -100 where the sequence
    lengths differ)."""
    group = [g.detach() if torch.is_tensor(g) else g for g in group if g is not None]
    if not group:
        return host
    if all(torch.is_tensor(g) and g.shape[1:] == group[0].shape[1:] for g in group):
        group = [torch.cat(group)]  # one device-to-host copy for the group
    for array in nested_numpify(group):
        host = array if host is None else nested_concat(host, array, padding_index=-100)
    return host
