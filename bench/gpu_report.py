"""Every GPU figure the project reports, in one command: a table, then one JSON line.

    python bench/gpu_report.py                 # one GPU: GPT-2 124M at seq 1024
    python bench/gpu_report.py --smoke         # the same report at tiny size, on a CPU too (CI runs it)
    python bench/gpu_report.py --json          # ... the JSON line only on stdout's last line either way

Sections, each run as the user would run it (the CLI and the benches, in child processes, each under a
timeout; a section that fails is reported as such and the others still run):
  versions     python, torch (+ CUDA), DeepSpeed, the GPUs
  doctor       its problem and warning counts, and the optimizer the default config runs
  bench        bench/train_throughput.py: ours against Hugging Face at the same shape, tokens/s and MFU
  loop         `trainer.cli pretrain` at that shape, compile off and on: tokens/s and its ratio to the bench
  adam         the same loop with torch's AdamW (zero2_bf16: fused on a GPU) against DeepSpeed's FusedAdam
               (zero2_fusedadam_bf16, built on first use): tokens/s and their ratio
  muon         gpt25-speedrun through pretrain: Muon (zero2_muon_bf16) against AdamW (zero2_bf16) tokens/s
  memory       bench/memory.py gpu: peak allocated against the estimate, GPT-2 Medium at micro-batch 8, at
               the largest micro-batch the estimate fits in 24 GB, and with activation checkpointing (GPU only)
  exactness    losses of two uninterrupted runs and one paused and resumed, with --deterministic (bitwise?)
               and without (the resumed run's drift against the run-to-run drift)
"""
import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.helpers import step_records  # noqa: E402 (the repository goes on sys.path first)

SHAPES = {  # model, its data's tokenizer, seq_len, micro_batch, steps of each loop run, the memory checks' seq_len
    "full": dict(model="gpt2", tokenizer="gpt2", seq_len=1024, micro_batch=16, steps=20, muon_model="gpt25-speedrun",
                 memory_seq=1024),
    "smoke": dict(model="tiny", tokenizer="bytes", seq_len=64, micro_batch=4, steps=8, muon_model="tiny",
                  memory_seq=64),
}


def run(cmd: list, timeout: int, log: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    log.write_text(f"$ {' '.join(map(str, cmd))}\n{proc.stdout}\n{proc.stderr}")
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"exit {proc.returncode}: {tail} (log: {log})")
    return proc


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("{")))


class Report:
    def __init__(self, args):
        self.args, self.shape = args, SHAPES["smoke" if args.smoke else "full"]
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.results = {}

    def section(self, name, fn):
        started = time.perf_counter()
        try:
            self.results[name] = fn()
        except Exception as e:  # a report of what failed, not a traceback: the other sections still run
            self.results[name] = {"error": f"{type(e).__name__}: {e}"}
        self.results[name]["seconds"] = round(time.perf_counter() - started, 1)
        print(f"[{name}] {json.dumps(self.results[name])}", file=sys.stderr, flush=True)

    # ---- sections ---------------------------------------------------------------------------------------

    def versions(self) -> dict:
        import deepspeed
        import torch

        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "deepspeed": deepspeed.__version__, "gpus": gpus or ["none (CPU)"]}

    def doctor(self) -> dict:
        proc = subprocess.run([sys.executable, "-m", "trainer.cli", "doctor", "--json", "--out", str(self.work),
                               "--model", self.shape["model"]], cwd=REPO, capture_output=True, text=True, timeout=300)
        report = last_json(proc)  # doctor exits 1 when a check fails: the counts say so
        checks = {c["name"]: c for c in report["checks"]}
        return {"problems": report["fails"], "warnings": report["warnings"],
                "optimizer": checks.get("optimizer", {}).get("detail"),
                "failed": [f"{c['name']}: {c['detail']}" for c in report["checks"] if c["status"] == "fail"]}

    def bench(self) -> dict:
        s = self.shape
        vocab = json.loads((self.data() / "meta.json").read_text())["vocab_size"]
        proc = run([sys.executable, "bench/train_throughput.py", "--model", s["model"], "--seq-len", s["seq_len"],
                    "--micro-batch", s["micro_batch"], "--data", self.data(), "--set", f"vocab_size={vocab}",
                    "--json", "--steps", 3 if self.args.smoke else 10], 900, self.work / "bench.log")
        out = last_json(proc)
        pick = ("tokens_per_s", "mfu", "step_s")
        return {**{impl: {k: out["results"][impl][k] for k in pick} for impl in out["results"]},
                "ours_over_hf": out.get("ratio_ours_hf"), "peak": out["peak_source"], "device": out["device"]}

    def data(self) -> Path:
        """The pydoc corpus in the shape's tokenizer (the bench and the loop read the same tokens)."""
        from trainer.data.convert import convert

        tokenizer = self.shape["tokenizer"]
        out = self.work / f"data-{tokenizer}"
        convert("pydoc", tokenizer, out, val_tokens=20_000, progress=False)
        return out

    def pretrain(self, out: Path, *extra, model=None, log_every: int = 1) -> list[dict]:
        s = self.shape
        run([sys.executable, "-m", "trainer.cli", "pretrain", "--model", model or s["model"], "--data", self.data(),
             "--out", out, "--seq-len", s["seq_len"], "--micro-batch", s["micro_batch"], "--max-steps", s["steps"],
             "--eval-every", 0, "--save-every", 0, "--log-every", log_every, "--no-tracking", "--resume", "auto",
             *extra], 900, out.with_suffix(".log"))
        return step_records(out)

    def tokens_per_s(self, out: Path, *extra, model=None) -> float:
        """Median training tokens/s of the run's logging windows after the first (warm-up, compilation)."""
        rates = [r["tokens_per_s"] for r in self.pretrain(out, *extra, model=model,
                                                          log_every=max(1, self.shape["steps"] // 6))]
        return statistics.median(rates[1:])

    def loop(self) -> dict:
        eager = self.tokens_per_s(self.work / "loop-eager", "--no-compile", "--resume", "never")
        compiled = self.tokens_per_s(self.work / "loop-compiled", "--compile", "--resume", "never")
        bench = (self.results.get("bench") or {}).get("ours", {}).get("tokens_per_s")
        best = max(eager, compiled)
        return {"eager_tokens_per_s": eager, "compiled_tokens_per_s": compiled, "compile_speedup": compiled / eager,
                "loop_over_bench": best / bench if bench else None}

    def adam(self) -> dict:
        torch_adam = self.tokens_per_s(self.work / "adam-torch", "--ds-config", "zero2_bf16", "--resume", "never",
                                       "--no-compile")
        fused_adam = self.tokens_per_s(self.work / "adam-deepspeed", "--ds-config", "zero2_fusedadam_bf16",
                                       "--resume", "never", "--no-compile")
        return {"torch_adamw_tokens_per_s": torch_adam, "deepspeed_fusedadam_tokens_per_s": fused_adam,
                "torch_over_fusedadam": torch_adam / fused_adam}

    def muon(self) -> dict:
        model = self.shape["muon_model"]
        adamw = self.tokens_per_s(self.work / "adamw", "--ds-config", "zero2_bf16", "--resume", "never", model=model)
        muon = self.tokens_per_s(self.work / "muon", "--ds-config", "zero2_muon_bf16", "--resume", "never",
                                 model=model)
        return {"adamw_tokens_per_s": adamw, "muon_tokens_per_s": muon, "muon_over_adamw": muon / adamw}

    def memory(self) -> dict:
        import torch

        from trainer import memory
        from trainer.engine.ds_config import load_ds_config

        if not torch.cuda.is_available():
            return {"skipped": "no GPU: peak allocated memory is a CUDA measurement"}
        seq = self.shape["memory_seq"]
        fits_24gb = memory.estimate("gpt2-medium", load_ds_config("zero2_bf16"), seq_len=seq,
                                    gpu_memory_gb=24.0).max_micro_batch
        out = {}
        for name, micro, extra in (("micro_batch_8", 8, []), (f"micro_batch_{fits_24gb}_fits_24gb", fits_24gb, []),
                                   ("micro_batch_8_checkpointing", 8, ["--activation-checkpointing"])):
            proc = run([sys.executable, "bench/memory.py", "gpu", "--model", "gpt2-medium", "--micro-batch", micro,
                        "--seq-len", seq, *extra], 600, self.work / f"memory-{name}.log")
            m = last_json(proc)
            out[name] = {"measured_gb": round(m["max_memory_allocated_gb"], 2),
                         "estimated_gb": round(m["estimated_allocated_gb"], 2)}
        return out

    def exactness(self) -> dict:
        out = {}
        half = self.shape["steps"] // 2
        for mode, extra in (("deterministic", ["--deterministic"]), ("default", [])):
            a = [r["loss"] for r in self.pretrain(self.work / f"{mode}-a", *extra, "--resume", "never")]
            b = [r["loss"] for r in self.pretrain(self.work / f"{mode}-b", *extra, "--resume", "never")]
            paused = self.work / f"{mode}-resumed"
            self.pretrain(paused, *extra, "--resume", "never", "--stop-after-steps", half)
            c = [r["loss"] for r in self.pretrain(paused, *extra)]
            out[mode] = {"two_runs_bitwise": a == b, "resumed_bitwise": a == c,
                         "run_to_run_max_diff": max(abs(x - y) for x, y in zip(a, b)),
                         "resumed_max_diff": max(abs(x - y) for x, y in zip(a, c))}
        return out

    # ---- output -----------------------------------------------------------------------------------------

    def table(self) -> str:
        rows = []
        for section, values in self.results.items():
            for key, value in values.items():
                if isinstance(value, dict):
                    for k, v in value.items():
                        rows.append((section, f"{key}.{k}", v))
                else:
                    rows.append((section, key, value))
        width = max(len(f"{s} {k}") for s, k, _ in rows)
        return "\n".join(f"{f'{s} {k}':<{width}}  {_show(v)}" for s, k, v in rows)


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: the whole report in a few minutes on a CPU")
    parser.add_argument("--work", default=str(REPO / "runs" / "gpu-report"), help="scratch directory for the runs")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--sections", default="versions,doctor,bench,loop,adam,muon,memory,exactness",
                        help="comma-separated subset, in this order")
    args = parser.parse_args(argv)
    report = Report(args)
    for name in args.sections.split(","):
        report.section(name, getattr(report, name))
    if not args.json:
        print(report.table())
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "smoke": args.smoke, **report.results}))


if __name__ == "__main__":
    main()
