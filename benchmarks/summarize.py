"""One short table from the JSON files that benchmarks/gpu_check.sh gathers, with MFU against the bf16 matmul rate
measured in the same call when anchors.json (benchmarks/hf_baseline_gpu.py) holds it:

- throughput_<label>.json: benchmarks/throughput.py;
- anchors.json: benchmarks/hf_baseline_gpu.py;
- script_<model>.json: the train_results.json of a real script (run_clm.py, run_pretraining.py), set next to our
  side of throughput_<model>.json, the benchmark it must come within 10% of;
- packing_<label>.json: benchmarks/packing.py (benchmarks/gpu_packing.sh), real tokens/s of the padded and the
  packed side of each sequence length (and of the packed rows through the mask, where the packed side took the
  variable-length kernel), and their ratios.

    python benchmarks/summarize.py [--combined results.json] FILE...

--combined writes every input file's content into one JSON (so that one file carries a whole run back)."""
import json
import os
import sys


def load(path):
    with open(path) as handle:
        return json.load(handle)


def anchor_rows(data):
    return [dict(run=f"baseline {r['name']}", tokens_per_s=r["tokens_per_s"], seq_per_s=r["seq_per_s"],
                 tflops=r["tflops"], peak_mem_GB=r["peak_mem_GB"]) for r in data["rows"]]


def throughput_rows(label, data):
    rows = []
    for r in data["rows"]:
        if "error" in r:
            rows.append(dict(run=f"{label} {r['side']}", error=r["error"].strip().splitlines()[-1][:100]))
        else:
            rows.append(dict(run=f"{label} {r['side']}", tokens_per_s=r["tokens_per_s"], seq_per_s=r["seq_per_s"],
                             tflops=r["tflops"], peak_mem_GB=r["peak_mem_GB"], step_ms=r["step_ms"]))
    if "ours_over_hf_tokens_per_s" in data:
        rows.append(dict(run=f"{label} ours/hf", ratio=data["ours_over_hf_tokens_per_s"]))
    return rows


def script_rows(model, metrics, benchmarks):
    """The script's own throughput metrics; TFLOP/s by the benchmark's FLOPs per token, for the same MFU basis."""
    ours = next((r for r in benchmarks.get(f"throughput_{model}", {}).get("rows", [])
                 if r.get("side") == "ours" and "error" not in r), None)
    tokens = metrics.get("train_tokens_per_second")
    if tokens is None:
        return [dict(run=f"script {model}", error="no train_tokens_per_second in its train_results.json")]
    peak_gb = metrics.get("train_mem_gpu_peaked_delta", 0) + metrics.get("train_mem_gpu_alloc_delta", 0)
    row = dict(run=f"script {model}", tokens_per_s=tokens, seq_per_s=metrics.get("train_samples_per_second", 0),
               tflops=round(tokens * ours["tflops"] / ours["tokens_per_s"], 3) if ours else 0,
               peak_mem_GB=round(peak_gb / 2 ** 30, 3) if peak_gb else "-")
    rows = [row]
    if ours:
        rows.append(dict(run=f"script {model} / benchmark ours", ratio=round(tokens / ours["tokens_per_s"], 3)))
    return rows


def packing_rows(label, data):
    rows = []
    for run in data["runs"]:
        name = f"packing {label}" if len(data["runs"]) == 1 else f"packing {label} seq {run['seq']}"
        for side in ("padded", "packed", "packed_mask"):  # packed_mask: where packed rows took the kernel
            if side not in run:
                continue
            r = run[side]
            rows.append(dict(run=f"{name} {side}", tokens_per_s=r["real_tokens_per_s"],
                             seq_per_s=r["pairs_per_step"] * 1e3 / r["ms_per_step"], step_ms=r["ms_per_step"],
                             tflops=None, peak_mem_GB=r["peak_memory_GB"]))  # no FLOP count for packed rows
        rows.append(dict(run=f"{name} packed/padded", ratio=run["packed_over_padded"]))
        if "kernel_over_mask" in run:
            rows.append(dict(run=f"{name} packed kernel/mask", ratio=run["kernel_over_mask"]))
    return rows


def main(argv):
    combined = None
    if argv[:1] == ["--combined"]:
        combined, argv = argv[1], argv[2:]
    contents = {os.path.basename(p)[:-len(".json")]: load(p) for p in argv if os.path.exists(p)}
    peak = contents.get("anchors", {}).get("peak_tflops")
    rows = []
    for name, data in contents.items():
        if name == "anchors":
            rows += anchor_rows(data)
        elif name.startswith("throughput_"):
            rows += throughput_rows(name[len("throughput_"):], data)
        elif name.startswith("script_"):
            rows += script_rows(name[len("script_"):], data, contents)
        elif name.startswith("packing_"):
            rows += packing_rows(name[len("packing_"):], data)
    basis = f"of measured {round(peak)} TFLOP/s" if peak else "no measured peak in this call"
    print(f"\nrun | tokens/s | seq/s | ms/step | TFLOP/s | MFU % ({basis}) | peak GB")
    for r in rows:
        if "error" in r:
            print(f"{r['run']} | FAILED: {r['error']}")
        elif "ratio" in r:
            print(f"{r['run']} | x{r['ratio']} tokens/s")
        else:
            mfu = f"{100 * r['tflops'] / peak:.1f}" if peak and r["tflops"] else "-"
            print(f"{r['run']} | {r['tokens_per_s']:.0f} | {r['seq_per_s']:.1f} | {r.get('step_ms', '-')} | "
                  f"{'-' if r['tflops'] is None else r['tflops']} | {mfu} | {r['peak_mem_GB']}")
    if combined:
        with open(combined, "w") as handle:
            json.dump(dict(contents, table=rows), handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
