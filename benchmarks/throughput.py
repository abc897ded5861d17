"""Training throughput of IPUTrainer against transformers.Trainer, same model, batch, precision and optimizer
(AdamW), in one run, plus a plain PyTorch loop (no data loader, no trainer) as the floor for host overhead.

    python benchmarks/throughput.py --model gpt2                 # tiny model on the CPU: host overhead per step
    python benchmarks/throughput.py --model bert --size full     # BERT-base pretraining, seq 128, micro-batch 128
    python benchmarks/throughput.py --model gpt2 --profile       # plus a cProfile summary of our step loop
    python benchmarks/throughput.py --sides ours --kernel_profile  # where our step's device time goes

Each trainer runs with its own defaults unless told otherwise: ours compiles the step on CUDA (eager on the CPU),
transformers.Trainer runs eagerly. --torch_compile compiles both, --no_torch_compile runs both eagerly, --cuda_graphs
replays our compiled step as CUDA graphs.

Synthetic token ids (throughput only). Each side runs in its own process, so that peak memory (CUDA: allocated;
CPU: resident set) is its own and no compiled state carries over. Throughput is timed from the end of step
`--warmup` to the end of step `--steps` with a device synchronisation at both ends. Prints a table; writes JSON to
--json, else $OUT/throughput_<model>_<size>.json ($OUT defaults to the temporary directory).

Our side (IPU configuration defaults, `embedding_serialization_factor` as shipped: gpt2 4, bert-base 1) trains
with the serialized heads: GPT-2's loss in chunks without the logits tensor; BERT's MLM head only at the masked
positions, with the same static cap the data collator uses (`masked_token_cap`), which the synthetic labels
respect."""
import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import resource
import subprocess
import sys
import tempfile
import time

import torch

SIZES = {
    ("gpt2", "tiny"): dict(config=dict(n_layer=2, n_embd=64, n_head=2, vocab_size=4096, n_positions=128),
                           seq=128, micro_batch=8),
    ("gpt2", "full"): dict(config={}, seq=1024, micro_batch=16),  # GPT-2 124M
    ("bert", "tiny"): dict(config=dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                                       intermediate_size=256, vocab_size=4096), seq=128, micro_batch=16),
    ("bert", "full"): dict(config={}, seq=128, micro_batch=128),  # BERT-base pretraining (MLM + NSP)
}
SHIPPED_SERIALIZATION = {"gpt2": 4, "bert": 1}
MLM_PROBABILITY = 0.15
SIDES = ("ours", "hf", "loop")
KERNEL_PROFILE_STEPS = 3


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["gpt2", "bert"], default="gpt2")
    p.add_argument("--size", choices=["tiny", "full"], default="full" if cuda else "tiny")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per side")
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the timing")
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of: " + ", ".join(SIDES))
    p.add_argument("--micro_batch", type=int, help="default: 16 for gpt2 full, 128 for bert full, 8/16 tiny")
    p.add_argument("--serialization_factor", type=int, help="our embedding_serialization_factor (default: shipped)")
    compile_choice = p.add_mutually_exclusive_group()
    compile_choice.add_argument("--torch_compile", action="store_true", help="torch_compile=True on both trainers")
    compile_choice.add_argument("--no_torch_compile", action="store_true", help="both trainers eager")
    p.add_argument("--cuda_graphs", action="store_true", help="our side with --cuda_graphs (CUDA only)")
    p.add_argument("--no_host_overlap", action="store_true",
                   help="our side with each group's host read in place and no read-ahead of the next group's first "
                        "step (both overlap host work with the device by default; the read-ahead on CUDA only)")
    p.add_argument("--profile", action="store_true", help="cProfile our side; summary printed and saved")
    p.add_argument("--kernel_profile", action="store_true",
                   help=f"torch.profiler over our side's {KERNEL_PROFILE_STEPS} steps after the warm-up: the kernels "
                        "(CPU: operators) by their own time, printed and saved; that side's timing includes the "
                        "profiler's cost")
    p.add_argument("--sync_debug", action="store_true",
                   help="CUDA only: record every operation of our side's timed steps that makes the host wait for the "
                        "device (torch.cuda.set_sync_debug_mode), with where it was called; saved beside the JSON")
    p.add_argument("--json", help="where to write the results (default: $OUT/throughput_<model>_<size>.json)")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)  # internal: run one side, print RESULT
    opts = p.parse_args(argv)
    spec = SIZES[(opts.model, opts.size)]
    opts.seq = spec["seq"]
    opts.micro_batch = opts.micro_batch or spec["micro_batch"]
    opts.serialization_factor = opts.serialization_factor or SHIPPED_SERIALIZATION[opts.model]
    opts.device = "cuda" if cuda else "cpu"
    if opts.cuda_graphs and (not cuda or opts.no_torch_compile):
        p.error("--cuda_graphs needs a CUDA device and torch.compile")
    if opts.sync_debug and not cuda:
        p.error("--sync_debug needs a CUDA device")
    if not 0 <= opts.warmup < opts.steps:
        p.error(f"--warmup must lie in [0, --steps): got {opts.warmup} and {opts.steps}")
    if opts.kernel_profile and opts.steps < opts.warmup + KERNEL_PROFILE_STEPS:
        p.error(f"--kernel_profile profiles {KERNEL_PROFILE_STEPS} steps after the warm-up: raise --steps")
    unknown = set(opts.sides.split(",")) - set(SIDES)
    if unknown:
        p.error(f"--sides: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SIDES)}")
    return opts


# ------------------------------------------------------------------------------------------- model and data
def build_model(opts):
    from transformers import BertConfig, BertForPreTraining, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    overrides = SIZES[(opts.model, opts.size)]["config"]
    if opts.model == "gpt2":
        return GPT2LMHeadModel(GPT2Config(**overrides))
    return BertForPreTraining(BertConfig(**overrides))


class SyntheticTokens(torch.utils.data.Dataset):
    """One sequence per optimizer step's micro-batch slot, so the run is one epoch (no loader restarts)."""

    def __init__(self, opts, vocab_size):
        from ipu_train.data import masked_token_cap

        n, seq = opts.micro_batch * opts.steps, opts.seq
        g = torch.Generator().manual_seed(0)
        self.columns = {}
        if opts.model == "gpt2":
            ids = torch.randint(0, vocab_size, (n, seq), generator=g)
            self.columns = {"input_ids": ids, "labels": ids}
            return
        ids = torch.randint(5, vocab_size, (n, seq), generator=g)
        masked = torch.rand(n, seq, generator=g) < MLM_PROBABILITY
        # Keep the first `cap` masked positions per sequence, as the capped data collator does.
        masked &= masked.cumsum(1) <= masked_token_cap(seq, MLM_PROBABILITY)
        self.columns = {
            "input_ids": ids,
            "token_type_ids": (torch.arange(seq) >= seq // 2).long().expand(n, seq),
            "attention_mask": torch.ones(n, seq, dtype=torch.long),
            "labels": torch.where(masked, ids, -100),
            "next_sentence_label": (torch.rand(n, generator=g) < 0.5).long(),
        }

    def __len__(self):
        return len(self.columns["input_ids"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.columns.items()}


def flops_per_token(model, seq):
    """6·N + 12·L·H·S, N all parameters: the convention of benchmarks/hf_baseline_gpu.py."""
    cfg = model.config
    return 6 * sum(p.numel() for p in model.parameters()) + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq


# --------------------------------------------------------------------------------------------------- timing
def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def make_step_timer(warmup, steps, device):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time between the ends of optimizer steps `warmup` and `steps` (global_step counts steps)."""

        def __init__(self):
            self.marks = {}

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, steps):
                synchronize(device)
                self.marks[state.global_step] = time.perf_counter()

        def seconds(self):
            return self.marks[steps] - self.marks[warmup] if warmup else self.marks[steps] - self.started

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

    return StepTimer()


def training_arguments(cls, opts, **extra):
    return cls(output_dir=os.path.join(tempfile.mkdtemp(prefix="throughput_"), "out"),
               per_device_train_batch_size=opts.micro_batch, max_steps=opts.steps, learning_rate=1e-4,
               bf16=opts.device == "cuda", use_cpu=opts.device == "cpu", logging_steps=10 ** 6, report_to="none",
               save_strategy="no", disable_tqdm=True, seed=0,
               dataloader_num_workers=2 if opts.device == "cuda" else 0, **extra)


def our_compile_flags(opts):
    """Our defaults (compiled on CUDA) unless the command line says otherwise."""
    if opts.no_torch_compile:
        return dict(no_torch_compile=True)
    flags = dict(torch_compile=True) if opts.torch_compile else {}
    return dict(flags, cuda_graphs=True) if opts.cuda_graphs else flags


# ---------------------------------------------------------------------------------------------------- sides
def run_hf(opts, model, dataset):
    from transformers import Trainer, TrainingArguments, default_data_collator

    timer = make_step_timer(opts.warmup, opts.steps, opts.device)
    args = training_arguments(TrainingArguments, opts, torch_compile=opts.torch_compile)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
                      callbacks=[timer])
    output = trainer.train()
    return dict(seconds=timer.seconds(), loss=output.training_loss, compiled=args.torch_compile,
                optimizer=getattr(args.optim, "value", str(args.optim)))


def run_ours(opts, model, dataset):
    from transformers import default_data_collator

    from ipu_train import IPUConfig, IPUTrainer, IPUTrainingArguments
    from ipu_train.data import masked_token_cap
    from ipu_train.pipeline.heads import enable_serialized_heads

    ipu_config = IPUConfig(embedding_serialization_factor=opts.serialization_factor)
    if opts.model == "bert":  # the trainer would patch without a cap: give it the collator's
        enable_serialized_heads(model, ipu_config, max_predictions=masked_token_cap(opts.seq, MLM_PROBABILITY))
    timer = make_step_timer(opts.warmup, opts.steps, opts.device)
    kernels = make_kernel_profiler(opts.warmup, opts.device) if opts.kernel_profile else None
    syncs = make_sync_recorder(opts.warmup, opts.steps) if opts.sync_debug else None
    args = training_arguments(IPUTrainingArguments, opts, throughput_warmup_steps=opts.warmup,
                              **our_compile_flags(opts))
    trainer = IPUTrainer(model=model, ipu_config=ipu_config, args=args, train_dataset=dataset,
                         data_collator=default_data_collator,
                         callbacks=[timer] + [callback for callback in (kernels, syncs) if callback])
    if opts.no_host_overlap:
        trainer.read_ahead = trainer.defer_quiet_reads = False
    profiler = cProfile.Profile() if opts.profile else None
    if profiler:
        profiler.enable()
    output = trainer.train()
    result = dict(seconds=timer.seconds(), loss=output.training_loss, compiled=args.torch_compile,
                  read_ahead=trainer.read_ahead, deferred_reads=trainer.defer_quiet_reads,
                  optimizer=type(trainer.optimizer).__name__ + (" fused" if opts.device == "cuda" else " foreach"),
                  self_reported_tokens_per_s=output.metrics.get("train_tokens_per_second"))
    if profiler:
        profiler.disable()
        result["profile"] = save_profile(profiler, opts)
    if kernels:
        result["kernel_profile"] = save_text(kernels.table(), f"kernels_ours_{opts.model}_{opts.size}.txt")
    if syncs:
        result["host_syncs"] = syncs.count()
        result["host_sync_report"] = save_text(syncs.report(), f"syncs_ours_{opts.model}_{opts.size}.txt")
    return result


def run_loop(opts, model, dataset):
    """The floor: pre-stacked batches already on the device, forward/backward/AdamW, nothing else."""
    from transformers import default_data_collator

    model.to(opts.device).train()
    cuda = opts.device == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda or None, foreach=None if cuda else True)
    batches = [{k: v.to(opts.device) for k, v in
                default_data_collator([dataset[i] for i in range(s * opts.micro_batch, (s + 1) * opts.micro_batch)]
                                      ).items()} for s in range(opts.steps)]
    autocast = torch.autocast(opts.device, dtype=torch.bfloat16, enabled=cuda)
    losses = torch.zeros((), device=opts.device)
    start = time.perf_counter()
    for step, batch in enumerate(batches, start=1):
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses += loss.detach()
        if step == opts.warmup:
            synchronize(opts.device)
            start = time.perf_counter()
    synchronize(opts.device)
    return dict(seconds=time.perf_counter() - start, loss=(losses / opts.steps).item(), compiled=False,
                optimizer="AdamW " + ("fused" if cuda else "foreach"))


def save_profile(profiler, opts, top=30):
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(top)
    return save_text(stream.getvalue(), f"profile_ours_{opts.model}_{opts.size}.txt")


def save_text(text, name):
    path = os.path.join(output_dir(), name)
    with open(path, "w") as handle:
        handle.write(text)
    return path


def make_kernel_profiler(warmup, device):
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    cuda = device == "cuda"

    class KernelProfile(TrainerCallback):
        """torch.profiler from the start of step `warmup + 1` to the end of step `warmup + KERNEL_PROFILE_STEPS`."""

        def __init__(self):
            self.profiler = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
            self.steps = 0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                self.profiler.start()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup + KERNEL_PROFILE_STEPS:
                synchronize(device)  # the kernels launched in the window have run
                self.profiler.stop()
                self.steps = KERNEL_PROFILE_STEPS

        def table(self, rows=25):
            sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
            header = f"{self.steps} optimizer steps, sorted by {sort_by}\n"
            return header + self.profiler.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=60)

    return KernelProfile()


def make_sync_recorder(warmup, steps):
    """Every synchronising CUDA operation between the start of step `warmup + 1` and the end of step `steps`, by
    the stack it was called from (torch.cuda.set_sync_debug_mode("warn") turns each into a warning)."""
    import collections
    import traceback
    import warnings

    from transformers import TrainerCallback

    class SyncRecorder(TrainerCallback):
        def __init__(self):
            self.stacks = collections.Counter()
            self.show_warning = warnings.showwarning

        def _record(self, message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message).lower():
                frames = [f for f in traceback.extract_stack(limit=14)[:-1] if not f.filename.endswith("warnings.py")]
                self.stacks["".join(traceback.format_list(frames))] += 1
            else:
                self.show_warning(message, category, filename, lineno, file, line)

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                self.filters = warnings.filters[:]
                warnings.simplefilter("always")
                warnings.showwarning = self._record
                torch.cuda.set_sync_debug_mode("warn")

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == steps:
                torch.cuda.set_sync_debug_mode("default")
                warnings.showwarning = self.show_warning
                warnings.filters[:] = self.filters

        def count(self):
            return sum(self.stacks.values())

        def report(self):
            return f"{self.count()} synchronising operations in steps {warmup + 1}-{steps}\n\n" + "\n".join(
                f"{n} times from:\n{stack}" for stack, n in self.stacks.most_common())

    return SyncRecorder()


def worker(opts):
    model = build_model(opts)
    dataset = SyntheticTokens(opts, model.config.vocab_size)
    flops = flops_per_token(model, opts.seq)
    params = sum(p.numel() for p in model.parameters())
    if opts.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats()
    result = {"ours": run_ours, "hf": run_hf, "loop": run_loop}[opts.worker](opts, model, dataset)
    timed_steps = opts.steps - opts.warmup
    tokens_per_s = timed_steps * opts.micro_batch * opts.seq / result["seconds"]
    if opts.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 1e9
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux: the process's peak RSS
    result.update(side=opts.worker, params_M=round(params / 1e6, 1), tokens_per_s=round(tokens_per_s, 1),
                  seq_per_s=round(tokens_per_s / opts.seq, 2), step_ms=round(1e3 * result.pop("seconds") / timed_steps, 2),
                  tflops=round(tokens_per_s * flops / 1e12, 3), peak_mem_GB=round(peak, 3),
                  loss=round(result["loss"], 4))
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------- driver
def output_dir():
    path = os.environ.get("OUT") or tempfile.gettempdir()
    os.makedirs(path, exist_ok=True)
    return path


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    for line in open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def run_side(side, argv):
    """One side in a fresh process; returns its RESULT dict, or an error dict with the tail of its output."""
    command = [sys.executable, os.path.abspath(__file__), *argv, "--worker", side]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return dict(side=side, error=f"exit {done.returncode}: " + (done.stderr or done.stdout)[-2000:])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    if opts.worker:
        return worker(opts)
    precision = "bf16 autocast" if opts.device == "cuda" else "fp32"
    header = (f"{opts.model} ({opts.size}), seq {opts.seq} x micro-batch {opts.micro_batch}, {opts.steps} steps "
              f"({opts.warmup} warm-up), {precision}, {compile_description(opts)}, "
              f"serialization factor {opts.serialization_factor}, {device_name(opts.device)}")
    print(header, flush=True)
    rows = []
    for side in opts.sides.split(","):
        started = time.perf_counter()
        row = run_side(side, argv)
        row["wall_s"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    by_side = {r["side"]: r for r in rows if "error" not in r}
    summary = dict(header=header, command="python benchmarks/throughput.py " + " ".join(argv),
                   device=device_name(opts.device), torch=torch.__version__, rows=rows,
                   date=time.strftime("%Y-%m-%d"))
    if "ours" in by_side and "hf" in by_side:
        summary["ours_over_hf_tokens_per_s"] = round(by_side["ours"]["tokens_per_s"] / by_side["hf"]["tokens_per_s"], 3)
    path = opts.json or os.path.join(output_dir(), f"throughput_{opts.model}_{opts.size}.json")
    with open(path, "w") as handle:
        json.dump(summary, handle, indent=1)
    print_table(rows, summary)
    print(f"JSON: {path}")
    if "profile" in by_side.get("ours", {}):
        print(f"cProfile of our run (top 30 by cumulative time): {by_side['ours']['profile']}")
        with open(by_side["ours"]["profile"]) as handle:
            print("\n".join(handle.read().splitlines()[:45]))
    if "kernel_profile" in by_side.get("ours", {}):
        print(f"Kernel profile of our run: {by_side['ours']['kernel_profile']}")
        with open(by_side["ours"]["kernel_profile"]) as handle:
            print(handle.read())
    return 1 if any("error" in r for r in rows) else 0


def compile_description(opts):
    if opts.no_torch_compile:
        return "both eager"
    ours = "compiled" if opts.torch_compile or opts.device == "cuda" else "eager"
    ours += " + CUDA graphs" if opts.cuda_graphs else ""
    return f"ours {ours}, transformers.Trainer {'compiled' if opts.torch_compile else 'eager'}"


def print_table(rows, summary):
    print("\nside | tokens/s | seq/s | ms/step | TFLOP/s | peak mem GB | mean loss | compiled | optimizer")
    for r in rows:
        if "error" in r:
            print(f"{r['side']} | FAILED: {r['error'].splitlines()[-1] if r['error'].strip() else r['error']}")
            continue
        print(f"{r['side']} | {r['tokens_per_s']:.0f} | {r['seq_per_s']:.1f} | {r['step_ms']:.1f} | {r['tflops']} | "
              f"{r['peak_mem_GB']} | {r['loss']} | {r['compiled']} | {r['optimizer']}")
    if "ours_over_hf_tokens_per_s" in summary:
        print(f"ours / transformers.Trainer tokens/s: {summary['ours_over_hf_tokens_per_s']}")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    sys.exit(main())
