"""How much GPU memory a run needs, before it is launched (`python -m trainer.cli estimate-memory`).

Per GPU, the peak is the larger of two phases of a training step:

  forward/backward = params + grads + fp32 master + Adam moments + activation peak + reduce buckets
  optimizer step   = params + grads + fp32 master + Adam moments + step temporaries

plus a fixed CUDA context / NCCL allowance and an allocator-fragmentation margin. Every byte count
below is a formula in the model config and the DeepSpeed JSON; where it departs from a published
formula the comment says why; tests/test_memory.py holds the formulas to what a live engine and the
profiler measure (the figures are in docs/memory-and-performance.md).

Model states (bytes per parameter P, N data-parallel ranks, bf16 or fp16 with DeepSpeed 0.19.8):
  ZeRO paper (Rajbhandari et al. 2020, sec. 3): 2 (16-bit params) + 2 (16-bit grads) + 12 (fp32
  master, Adam m, v) = 16 B/param; stage 1 divides the 12 by N, stage 2 also the grads, stage 3 all.
  DeepSpeed's `estimate_zero2_model_states_mem_needs` uses 2P + 16P/N on the GPU (it counts fp32 grads).
  What DeepSpeed 0.19.8 really holds, by the sum of the tensors a live engine keeps (bench/memory.py
  engine, tests/test_memory.py): 2 + 2 + 4 + 8 at stage 0 and
  2 + (2 + 4 + 8)/N at stages 1 and 2: the 16-bit gradients are accumulated in the model dtype
  (`data_types.grad_accum_dtype` unset) and, with `contiguous_gradients`, stage 1 keeps only its
  gradient partition too. What the estimators leave out is transient:
  * reduce buckets: stages 1/2 allocate `reduce_bucket_size` elements of the gradient dtype, twice with
    `overlap_comm`, for the whole backward pass, whatever the model size (2 x 2e8 elements in our JSONs);
  * the optimizer step: stage 0 makes fp32 copies of every gradient and a flat fp32 buffer of them
    (+10 B/param at the peak); stages 1/2 flatten their partition and convert it to fp32 (+8 B/param / N).
  fp32 (no bf16/fp16 block): params 4, grads 4 (stage 0) or 4/N, Adam 8 at stage 0; stages 1/2 also
  keep a redundant fp32 copy of the partition (4/N).

Activations (per micro-batch of b sequences of s tokens, hidden h, a heads, FFN width f, L layers,
e = 2 bytes for bf16/fp16 activations, 4 for fp32): Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", eq. 1) give sbh(34 + 5as/h) bytes per layer for fp16 with
dropout and materialised attention scores. Our model differs, and the formula follows our model:
  * SDPA keeps no s x s scores: the 5as/h term becomes the fp32 log-sum-exp, 4abs bytes;
  * dropout is 0 in our recipes: no masks (Korthikanti's 2sbh of masks, 1 byte each, are dropped);
  * norms compute in fp32 (models/layers.py): LayerNorm saves its fp32 input (4 B/element, not 2);
    RMSNorm saves the fp32 input and the fp32 normalised tensor (8);
  * SwiGLU saves gate, silu(gate), up and their product: 4ef instead of GELU's 2ef per token.
  per layer = sbh * (2 * norm + 6e) + sb * (2e or 4e) * f + 4abs
  (bf16 GPT-2: 36sbh + 4abs, against Korthikanti's 34sbh + 5as^2b).
  Loss: the head computes the loss itself (models/loss.py) a chunk of 2**23 logits at a time, and keeps
  only dloss/dlogits, e*b*s*V_padded, plus fp32 per-token losses; its forward peaks with one chunk of
  logits and their fp32 copy on top, its backward with the head's fresh weight gradient (e*V_p*h).
  Activation checkpointing (torch.utils.checkpoint per block) keeps each block's input (e*sbh per
  layer) and recomputes one block at a time in backward.
  Backward working memory, fitted to profiler peaks of our model on CPU: a layer's backward needs
  e*sb*(f + h) on top of what it saved (no checkpointing), a recomputed layer 2e*sbh on top of its
  activations; both plus one fresh weight gradient (e*f*h) before it is accumulated or bucketed, and,
  with a tied head, the head's weight gradient, which autograd holds until the embedding's arrives.
Checked against the CPU profiler's allocation peak for small GPT-2 and GPT-2.5 models, with and
without checkpointing, and with the GPT-2 vocabulary (tests/test_memory.py, bench/memory.py
activations). On a GPU, where cuBLAS workspaces and SDPA kernels may differ, bench/memory.py gpu
(and bench/gpu_report.py) compares it with torch.cuda.max_memory_allocated.

GB here is 2**30 bytes everywhere.
"""
import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field

from models.loss import CHUNK_LOGITS
from trainer.errors import UserError

GB = 2 ** 30

# CUDA context + cuBLAS workspace + NCCL buffers: outside PyTorch's allocator, so outside
# max_memory_allocated. ~0.5 GiB context on recent drivers plus NCCL's per-peer buffers.
CUDA_CONTEXT_BYTES = int(1.0 * GB)
# The caching allocator rounds and fragments; 5% of the allocated peak is a common rule of thumb.
FRAGMENTATION = 0.05

# DeepSpeed's defaults when the JSON leaves a key out (deepspeed/runtime/zero/config.py).
DS_DEFAULTS = {"reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000,
               "overlap_comm": None, "contiguous_gradients": True,
               "stage3_prefetch_bucket_size": 50_000_000, "stage3_max_live_parameters": 1_000_000_000,
               "stage3_param_persistence_threshold": 100_000}


# ---- inputs -------------------------------------------------------------------------------------
@dataclass
class DSSetup:
    """What the estimate needs from a DeepSpeed JSON."""
    stage: int = 2
    precision: str = "bf16"           # bf16 | fp16 | fp32
    offload_optimizer: bool = False
    offload_param: bool = False
    reduce_bucket_size: int = 500_000_000
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    prefetch_bucket_size: int = 50_000_000
    grad_accum_dtype: str = ""        # data_types.grad_accum_dtype ("" = the model dtype)

    @classmethod
    def from_json(cls, config: dict) -> "DSSetup":
        from trainer.engine import ds_config

        zero = config.get("zero_optimization", {}) or {}
        stage = ds_config.zero_stage(config)
        if stage not in (0, 1, 2, 3):
            raise UserError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage}")
        overlap = zero.get("overlap_comm", DS_DEFAULTS["overlap_comm"])
        offload_param = (zero.get("offload_param", {}) or {}).get("device", "none") not in (None, "none")
        return cls(stage=stage, precision=ds_config.precision(config),
                   offload_optimizer=ds_config.offloads_optimizer(config), offload_param=offload_param,
                   reduce_bucket_size=int(float(zero.get("reduce_bucket_size", DS_DEFAULTS["reduce_bucket_size"]))),
                   overlap_comm=bool(stage == 3 if overlap is None else overlap),
                   contiguous_gradients=bool(zero.get("contiguous_gradients", DS_DEFAULTS["contiguous_gradients"])),
                   prefetch_bucket_size=int(float(zero.get("stage3_prefetch_bucket_size",
                                                           DS_DEFAULTS["stage3_prefetch_bucket_size"]))),
                   grad_accum_dtype=str((config.get("data_types", {}) or {}).get("grad_accum_dtype") or ""))

    @property
    def dtype_bytes(self) -> int:
        """Bytes per element of parameters, gradients and activations."""
        return 4 if self.precision == "fp32" else 2

    @property
    def grad_bytes(self) -> int:
        return 4 if self.grad_accum_dtype in ("fp32", "float32", "float") else self.dtype_bytes


def model_config(preset: str, overrides: dict | None = None):
    """The ModelConfig a run would build: padded vocabulary as trainer/train/pretrain.py pads it."""
    import models

    overrides = dict(overrides or {})
    try:
        cfg = models.get_config(preset, **overrides)
        if "padded_vocab_size" not in overrides:  # as pretrain.build_model_config pads it
            cfg = dataclasses.replace(cfg, padded_vocab_size=models.padded_vocab_size(cfg.vocab_size))
    except (ValueError, TypeError) as e:
        raise UserError(str(e))
    return cfg


def param_stats(cfg) -> dict:
    """Exact parameter count and largest tensor, from the real model built on the meta device (no memory)."""
    return dict(_param_stats(json.dumps(dataclasses.asdict(cfg), sort_keys=True)))


@functools.lru_cache(maxsize=64)
def _param_stats(cfg_json: str) -> tuple:
    import torch

    import models

    cfg = models.ModelConfig(**json.loads(cfg_json))

    with torch.device("meta"):
        model = models.GPT(cfg)
    sizes = [p.numel() for p in model.parameters()]
    return (("n_params", sum(sizes)), ("largest_param", max(sizes)))


# ---- model states -------------------------------------------------------------------------------
def model_state_bytes(n_params: int, ds: DSSetup, n_gpus: int, largest_param: int = 0) -> dict:
    """Per-GPU bytes of parameters, gradients, fp32 master, Adam moments and the step's temporaries;
    `cpu` is host memory per rank (optimizer offload). See the module docstring for the sources."""
    P, N, e, g = n_params, max(1, n_gpus), ds.dtype_bytes, ds.grad_bytes
    mixed = ds.precision in ("bf16", "fp16")
    out = {"params": 0.0, "grads": 0.0, "master": 0.0, "adam": 0.0, "step_temp": 0.0, "cpu": 0.0}
    if ds.stage == 0:
        out.update(params=e * P, grads=g * P, adam=8 * P, master=4 * P if mixed else 0)
        # mixed: fp32 copy of each grad + their flat fp32 concatenation + 16-bit copy-back;
        # fp32: the flat fp32 gradient.
        out["step_temp"] = (10 if mixed else 4) * P
        return out
    shard = P / N
    # Stages 1-2 keep a master fp32 partition even in fp32 (a redundant copy).
    out.update(params=e * (P if ds.stage < 3 else shard), grads=g * shard, master=4 * shard, adam=8 * shard,
               step_temp=8 * shard)
    if ds.stage == 3:
        # Gathered layers in flight: the prefetch bucket and the largest layer, in the 16-bit dtype
        # (DeepSpeed's estimate_zero3_model_states_mem_needs: largest_layer_params * 4 with fp32 grads).
        out["params"] += e * (ds.prefetch_bucket_size + 2 * largest_param)
    if ds.offload_optimizer:
        # Master, moments and the fp32 gradient partition live in host memory; the GPU keeps the 16-bit
        # params and gradient partition plus a staging buffer of the largest parameter.
        out["cpu"] = (4 + 8 + 4) * shard + e * shard
        out.update(master=0, adam=0, step_temp=e * largest_param)
    if ds.offload_param and ds.stage == 3:
        out["cpu"] += e * shard
        out["params"] = e * (ds.prefetch_bucket_size + 2 * largest_param)
    return out


def bucket_bytes(ds: DSSetup, n_params: int) -> int:
    """Gradient reduce buckets alive during backward: full `reduce_bucket_size` elements each, whatever
    the model size (stage_1_and_2.py setup_buckets).
    Stage 3 reduces through one bucket of at most the model's size."""
    if ds.stage in (1, 2):
        n = (2 if ds.overlap_comm else 1) if ds.contiguous_gradients else 0
        # ZeRO-2 reduces in the model dtype and adds into an fp32 partition when accumulating in fp32
        # (stage_1_and_2.py: use_grad_accum_attribute is off when gradients are partitioned).
        return n * ds.reduce_bucket_size * (ds.dtype_bytes if ds.stage == 2 else ds.grad_bytes)
    if ds.stage == 3:
        return min(ds.reduce_bucket_size, n_params) * ds.grad_bytes
    return 0


# ---- activations --------------------------------------------------------------------------------
def activation_bytes(cfg, micro_batch: int, seq_len: int, dtype_bytes: int, checkpointing: bool) -> dict:
    """Activation memory of one micro-batch: `stored` at the end of forward (incl. logits and loss),
    `peak` over forward and backward; both on top of parameters and gradients."""
    b, s, h, a, L = micro_batch, seq_len, cfg.n_embd, cfg.n_head, cfg.n_layer
    f, e = cfg.ffn_hidden, dtype_bytes
    Vp = cfg.padded_vocab_size
    sbh = s * b * h
    norm = 8 if cfg.norm == "rmsnorm" else 4            # fp32 bytes a norm keeps per element
    mlp = (4 if cfg.mlp == "swiglu" else 2) * e * s * b * f
    attn = 6 * e * sbh + 4 * a * b * s                 # norm output, q k v, SDPA output, fp32 log-sum-exp
    if cfg.rotary_dim and not cfg.llama_layout:
        attn += 2 * e * sbh                            # partial rotary: new q, k while the fused qkv lives on
    dropout = 2 * sbh + 2 * e * sbh if cfg.dropout > 0 else 0  # Korthikanti's masks and dropped copies
    layer = 2 * norm * sbh + attn + mlp + dropout
    final = norm * sbh + e * sbh                         # final norm input and its output (the head's input)
    # The loss (models/loss.py) keeps dloss/dlogits over the padded vocabulary, in the activation dtype,
    # and works on one chunk of tokens at a time: the head's output and its fp32 copy.
    tokens = b * s
    chunk = min(tokens, max(1, CHUNK_LOGITS // Vp))
    dlogits = e * tokens * Vp + 4 * tokens               # + the fp32 per-token losses
    loss_fwd_extra = chunk * Vp * (e + 4 if e != 4 else 4)
    loss_bwd_extra = e * Vp * h + 2 * e * tokens * h     # the head's fresh weight gradient, grad and scaled input
    weight_grad = e * f * h                              # a weight's fresh gradient before it is accumulated
    if checkpointing:
        blocks = L * e * sbh
        layer_bwd = layer + 2 * e * sbh + weight_grad    # one block recomputed plus its backward working set
    else:
        blocks = L * layer
        layer_bwd = e * s * b * (f + h) + weight_grad
    stored = blocks + final + dlogits
    # The loss peaks with everything stored; the blocks run backward after dlogits is freed.
    # With a tied head, autograd holds the head's weight gradient until the embedding's arrives at the end.
    tied_grad = e * Vp * h if cfg.tie_embeddings else 0
    peak = max(stored + max(loss_fwd_extra, loss_bwd_extra),
               stored - dlogits + e * tokens * h + tied_grad + layer_bwd)
    return {"per_layer": layer, "blocks": blocks, "final": final, "logits": dlogits, "stored": stored, "peak": peak}


# ---- the estimate -------------------------------------------------------------------------------
@dataclass
class Estimate:
    model: str
    ds_config: str
    stage: int
    precision: str
    offload_optimizer: bool
    gpus: int
    micro_batch: int
    seq_len: int
    activation_checkpointing: bool
    gpu_memory_gb: float
    n_params: int
    params_gb: float
    grads_gb: float
    optimizer_gb: float
    master_gb: float
    adam_gb: float
    activations_gb: float
    activations_no_checkpointing_gb: float
    activations_checkpointing_gb: float
    logits_gb: float
    buffers_gb: float
    step_temp_gb: float
    overhead_gb: float
    total_gb: float
    fits: bool
    max_micro_batch: int
    cpu_gb: float
    peak_phase: str
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _total_bytes(states: dict, act: dict, buckets: int) -> tuple[float, str]:
    fixed = states["params"] + states["grads"] + states["master"] + states["adam"]
    fwd_bwd = fixed + act["peak"] + buckets
    step = fixed + states["step_temp"]
    allocated = max(fwd_bwd, step)
    phase = "forward/backward" if fwd_bwd >= step else "optimizer step"
    return allocated * (1 + FRAGMENTATION) + CUDA_CONTEXT_BYTES, phase


def estimate(preset: str | None, ds_config: dict, *, overrides: dict | None = None, gpus: int = 1,
             micro_batch: int = 1, seq_len: int | None = None, activation_checkpointing: bool = False,
             gpu_memory_gb: float = 24.0, ds_name: str = "", model_cfg=None) -> Estimate:
    """The estimate for a preset (+ overrides), or for a run's own ModelConfig (`model_cfg`)."""
    for name, value in (("--gpus", gpus), ("--micro-batch", micro_batch)):
        if value is None or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value}")
    if gpu_memory_gb is None or gpu_memory_gb <= 0:
        raise UserError(f"--gpu-memory must be a positive number of GB, got {gpu_memory_gb}")
    cfg = model_cfg if model_cfg is not None else model_config(preset, overrides)
    seq_len = seq_len or cfg.block_size
    if seq_len < 1 or seq_len > cfg.block_size:
        raise UserError(f"--seq-len must be between 1 and the model's block_size {cfg.block_size}, got {seq_len}")
    ds = DSSetup.from_json(ds_config)
    stats = param_stats(cfg)
    P = stats["n_params"]
    states = model_state_bytes(P, ds, gpus, stats["largest_param"])
    buckets = bucket_bytes(ds, P)

    def total_for(mb: int, ckpt: bool):
        act = activation_bytes(cfg, mb, seq_len, ds.dtype_bytes, ckpt)
        return act, _total_bytes(states, act, buckets)

    act, (total, phase) = total_for(micro_batch, activation_checkpointing)
    limit = gpu_memory_gb * GB
    best = 0
    if total_for(1, activation_checkpointing)[1][0] <= limit:
        lo, hi = 1, 2
        while hi <= 1 << 20 and total_for(hi, activation_checkpointing)[1][0] <= limit:
            lo, hi = hi, hi * 2
        while hi - lo > 1:  # activations grow monotonically with the micro-batch: bisect
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if total_for(mid, activation_checkpointing)[1][0] <= limit else (lo, mid)
        best = lo
    notes = []
    if ds.stage == 3 or ds.offload_param:
        notes.append("ZeRO-3 figures follow DeepSpeed's estimator; not validated against a live engine here")
    if ds.precision == "fp16":
        notes.append("fp16 is counted like bf16 (same byte sizes); fp16 runs need a GPU to check")
    if cfg.dropout > 0:
        notes.append("dropout > 0: masks counted per Korthikanti et al., not measured")
    if gpus > 1 and ds.stage == 0:
        notes.append("ZeRO-0 replicates all optimizer state on every GPU; stage 1 or 2 divides it by --gpus")
    gb = lambda x: round(x / GB, 3)
    return Estimate(
        model=preset or "", ds_config=ds_name, stage=ds.stage, precision=ds.precision,
        offload_optimizer=ds.offload_optimizer,
        gpus=gpus, micro_batch=micro_batch, seq_len=seq_len, activation_checkpointing=activation_checkpointing,
        gpu_memory_gb=gpu_memory_gb, n_params=P,
        params_gb=gb(states["params"]), grads_gb=gb(states["grads"]),
        optimizer_gb=gb(states["master"] + states["adam"]), master_gb=gb(states["master"]), adam_gb=gb(states["adam"]),
        activations_gb=gb(act["peak"]),
        activations_no_checkpointing_gb=gb(activation_bytes(cfg, micro_batch, seq_len, ds.dtype_bytes, False)["peak"]),
        activations_checkpointing_gb=gb(activation_bytes(cfg, micro_batch, seq_len, ds.dtype_bytes, True)["peak"]),
        logits_gb=gb(act["logits"]), buffers_gb=gb(buckets), step_temp_gb=gb(states["step_temp"]),
        overhead_gb=gb(total - (total - CUDA_CONTEXT_BYTES) / (1 + FRAGMENTATION)),
        total_gb=gb(total), fits=total <= limit, max_micro_batch=best, cpu_gb=gb(states["cpu"] * gpus),
        peak_phase=phase, notes=notes)


# ---- recommendations ----------------------------------------------------------------------------
TABLE_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt25-medium")
TABLE_HARDWARE = ((1, 24.0), (2, 24.0), (1, 80.0))
CANDIDATES = ("zero2_bf16", "zero1_bf16", "zero0_bf16", "zero2_offload_bf16", "zero3_bf16")


def recommend(preset: str, gpus: int, gpu_memory_gb: float, seq_len: int = 1024, target_micro_batch: int = 8) -> dict:
    """Config, checkpointing and micro-batch for a model on given GPUs: the first candidate that reaches
    the target micro-batch without checkpointing (recompute costs ~1/3 more compute), else the largest
    micro-batch with checkpointing but without offload or ZeRO-3 (both move far more bytes per step),
    else the largest micro-batch of anything. The micro-batch is the largest power of two that fits
    (at most 32)."""
    from trainer.engine import ds_config

    options = []
    for name in CANDIDATES:
        config = ds_config.load_ds_config(name)
        for ckpt in (False, True):
            est = estimate(preset, config, gpus=gpus, micro_batch=1, seq_len=seq_len, activation_checkpointing=ckpt,
                           gpu_memory_gb=gpu_memory_gb, ds_name=name)
            options.append((name, ckpt, est.max_micro_batch))
    plain = [o for o in options if "offload" not in o[0] and "zero3" not in o[0]]  # no host traffic, no gathers
    no_ckpt = [o for o in plain if not o[1] and o[2] >= target_micro_batch]
    ckpt_only = [o for o in plain if o[1] and o[2] >= target_micro_batch]
    rest = [o for o in options if o[2] >= 1]
    if no_ckpt:
        name, ckpt, best = no_ckpt[0]
    elif ckpt_only or rest:
        name, ckpt, best = max(ckpt_only or rest, key=lambda o: (o[2], -CANDIDATES.index(o[0])))
    else:
        return {"model": preset, "gpus": gpus, "gpu_memory_gb": gpu_memory_gb, "ds_config": None, "fits": False}
    mb = min(32, 1 << int(math.log2(best)))
    est = estimate(preset, ds_config.load_ds_config(name), gpus=gpus, micro_batch=mb, seq_len=seq_len,
                   activation_checkpointing=ckpt, gpu_memory_gb=gpu_memory_gb, ds_name=name)
    return {"model": preset, "gpus": gpus, "gpu_memory_gb": gpu_memory_gb, "ds_config": name,
            "activation_checkpointing": ckpt, "micro_batch": mb, "max_micro_batch": best,
            "total_gb": est.total_gb, "fits": True, "n_params": est.n_params}


def table(seq_len: int = 1024) -> list[dict]:
    return [recommend(m, n, mem, seq_len) for m in TABLE_MODELS for n, mem in TABLE_HARDWARE]


def table_markdown(rows: list[dict], seq_len: int = 1024) -> str:
    lines = ["| model | GPUs | DeepSpeed config | act. checkpointing | micro-batch (max) | predicted GB/GPU |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        hw = f"{r['gpus']} x {r['gpu_memory_gb']:g} GB"
        if not r["fits"]:
            lines.append(f"| {r['model']} | {hw} | does not fit | | | |")
            continue
        lines.append(f"| {r['model']} ({r['n_params'] / 1e6:.0f}M) | {hw} | `{r['ds_config']}` | "
                     f"{'on' if r['activation_checkpointing'] else 'off'} | "
                     f"{r['micro_batch']} ({r['max_micro_batch']}) | {r['total_gb']:.1f} |")
    return "\n".join(lines)


# ---- output -------------------------------------------------------------------------------------
def format_table(est: Estimate) -> str:
    ck = "on" if est.activation_checkpointing else "off"
    rows = [
        ("parameters", est.params_gb, f"{est.precision}, ZeRO-{est.stage}"),
        ("gradients", est.grads_gb, "partitioned" if est.stage >= 1 else "replicated"),
        ("optimizer: fp32 master", est.master_gb, "on CPU" if est.offload_optimizer else ""),
        ("optimizer: Adam m, v", est.adam_gb, "on CPU" if est.offload_optimizer else ""),
        (f"activations (checkpointing {ck})", est.activations_gb, f"logits + loss {est.logits_gb:.2f} GB of it"),
        ("  ... without checkpointing", est.activations_no_checkpointing_gb, ""),
        ("  ... with checkpointing", est.activations_checkpointing_gb, ""),
        ("reduce buckets (backward)", est.buffers_gb, "reduce_bucket_size from the JSON"),
        ("optimizer-step temporaries", est.step_temp_gb, ""),
        ("CUDA context + allocator margin", est.overhead_gb, f"{CUDA_CONTEXT_BYTES / GB:.1f} GB + {FRAGMENTATION:.0%}"),
    ]
    out = [f"{est.model} ({est.n_params / 1e6:.1f}M params), {est.ds_config or 'ds config'}, {est.gpus} GPU(s), "
           f"micro-batch {est.micro_batch} x {est.seq_len} tokens", ""]
    out += [f"  {name:<34} {value:8.2f} GB  {note}".rstrip() for name, value, note in rows]
    verdict = "fits" if est.fits else "does NOT fit"
    out += ["  " + "-" * 46, f"  {'total per GPU (peak: ' + est.peak_phase + ')':<34} {est.total_gb:8.2f} GB  "
            f"{verdict} in {est.gpu_memory_gb:g} GB",
            f"  largest micro-batch that fits: {est.max_micro_batch}"]
    if est.offload_optimizer:
        out.append(f"  host memory for the offloaded optimizer (all {est.gpus} ranks): {est.cpu_gb:.2f} GB")
    out += [f"  note: {n}" for n in est.notes]
    return "\n".join(out)


def run(cfg, json_output: bool = False) -> dict:
    """`estimate-memory` (cfg: trainer.config.EstimateConfig): predicted per-GPU memory of the model under its
    DeepSpeed config on `gpus` GPUs (or, with `table`, the recommendation table); prints it and returns it as a
    dict (GB = 2**30 bytes)."""
    from trainer.engine.ds_config import load_ds_config, resolve_ds_config_path

    if cfg.table:
        rows = table(cfg.seq_len or 1024)
        print(json.dumps({"table": rows}) if json_output else table_markdown(rows, cfg.seq_len or 1024))
        return {"table": rows}
    config = load_ds_config(cfg.ds_config)
    name = resolve_ds_config_path(cfg.ds_config).stem
    est = estimate(cfg.model, config, overrides=cfg.model_overrides, gpus=cfg.gpus, micro_batch=cfg.micro_batch,
                   seq_len=cfg.seq_len, activation_checkpointing=cfg.activation_checkpointing,
                   gpu_memory_gb=cfg.gpu_memory, ds_name=name)
    result = est.to_dict()
    print(json.dumps(result) if json_output else format_table(est))
    return result


# ---- measurement helpers for validation (tests/test_memory.py, bench/memory.py) ------------------
def live_tensor_bytes(exclude: set | None = None) -> tuple[int, set]:
    """Bytes of every distinct tensor storage reachable by the garbage collector (views counted once)."""
    import gc

    import torch

    gc.collect()
    seen = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
                storage = obj.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        except Exception:  # half-built or exotic tensor subclasses
            continue
    keys = set(seen) - (exclude or set())
    return sum(seen[k] for k in keys), set(seen)


def profile_peak(forward, backward) -> dict:
    """Allocation timeline of `forward(); backward()` from the profiler: bytes allocated within it that are
    live at the end of forward, and the peaks of each phase (all relative to the start)."""
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("memory_forward"):
            forward()
        with record_function("memory_backward"):
            backward()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    finally:
        os.unlink(path)
    t_bwd = min(e["ts"] for e in events if e.get("name") == "memory_backward")
    live, stored, fwd_peak, bwd_peak = 0, None, 0, 0
    for ev in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        if ev["ts"] >= t_bwd and stored is None:
            stored = live
        live += ev["args"]["Bytes"]
        if ev["ts"] < t_bwd:
            fwd_peak = max(fwd_peak, live)
        else:
            bwd_peak = max(bwd_peak, live)
    stored = live if stored is None else stored
    return {"stored": stored, "forward_peak": fwd_peak, "backward_peak": bwd_peak, "peak": max(fwd_peak, bwd_peak)}


def measure_activations(cfg, micro_batch: int, seq_len: int, dtype, checkpointing: bool, seed: int = 0) -> dict:
    """Measured activation bytes of one training micro-batch of our model (forward with its loss, backward),
    with gradients allocated beforehand as in a training step (so only activations and temporaries count)."""
    import torch

    from models import GPT

    torch.manual_seed(seed)
    model = GPT(cfg).to(dtype).train()
    model.set_activation_checkpointing(checkpointing)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    x = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len))
    y = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len))
    state = {}

    def forward():
        state["loss"] = model(x, y)

    return profile_peak(forward, lambda: state["loss"].backward())
