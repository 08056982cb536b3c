"""Memory plan per rank from a model's shape alone (config.json or a preset; no weights read).

Components, in bytes per rank (p = parameter bytes: 4 for fp32, 2 for bf16; W = world size; n = adapter
entries; Llama-style decoder: per layer q, k, v, o, gate, up, down projections):
- frozen: the projections, 4-bit: numel/2 packed + quant state (fp32 absmax per 64-entry block, or with
  double_quant 1 byte per block + fp32 per 256 blocks, plus the code tables; never partitioned, as
  measured), else numel x p; embeddings, lm_head (unless tied) and norms x p. ZeRO-3 divides everything but the
  quant state by W.
- adapter: n x p (LoRA: r x (in + out) per targeted projection); / W under ZeRO-3.
- gradients: n x p; / W under ZeRO-2 and 3.
- optimizer: fp32 masters (4n; none at ZeRO-0 in fp32, where the parameters are the masters) and AdamW's
  two fp32 moments (8n) or SGD's momentum (4n); / W under ZeRO 1-3 and in bf16 (DeepSpeed's bf16
  optimizer partitions its fp32 state like ZeRO-1).
- masks (FISH only; keep_ratio None = plain PEFT): n / 8 bytes on every rank (packed, 1 bit per entry);
- mask_restore: 4 bytes (fp32 value) per masked entry of the masters this rank holds (fishds' enforcer).
- compact (fish.compact_optimizer): the two AdamW moments plus an int32 index for the selected entries
  only (12 x keep_ratio x n instead of 8n) and no enforcer copies; masters and gradients unchanged.
- largest gathered layer (ZeRO-3 only): the largest single parameter at full size.
- activations, per micro-batch of b sequences of s tokens, a = p bytes per element, SDPA/flash attention
  (no s x s term), hidden h, key/value width kv, MLP width I, vocab V, L layers:
    one layer keeps  b s (7h + 3kv + 4I + r t) a     (norm in/out x2, q, k, v, rotated q and k, attention
                                                       out, gate, up, act(gate), act(gate) x up; r per LoRA
                                                       target t for the A outputs)
    without gradient checkpointing: L x one layer;  with: L x b s h a (layer inputs) + one layer (recompute)
    plus the loss path (train.loss_impl, fishds/run/loss.py), its own line:
      full     b s V (a + 8)          the model's logits, their fp32 upcast in the loss and its gradient
      chunked  c V (a + 12) + b V a   one chunk of c target tokens (projection, fp32 upcast, log-softmax,
                                      gradient; c = train.loss_chunk_tokens, default 2^27 / (4 V)), and the
                                      last position's logits the model still returns
      liger    b s h (a + 4)          the input gradient liger computes in its forward, and its internal chunk
                                      of logits (about b s h / V rows of V fp32)
      cce      b s (h a + 8)          the input gradient and a log-sum-exp per token
No CUDA context, allocator cache or communication buffers are included.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Arch:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = False
    head_dim: int | None = None  # config.json's head_dim when it is not hidden / heads

    @property
    def kv(self) -> int:
        return (self.head_dim or self.hidden // self.heads) * self.kv_heads

    @property
    def q(self) -> int:
        return (self.head_dim or self.hidden // self.heads) * self.heads

    def shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one layer."""
        h, kv, i, q = self.hidden, self.kv, self.intermediate, self.q
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


PRESETS = {  # Llama-2 shapes (Touvron et al. 2023), SmolLM2-135M (the embedded default)
    "llama-7b": Arch(4096, 32, 32, 32, 11008, 32000),
    "llama-13b": Arch(5120, 40, 40, 40, 13824, 32000),
    "llama-70b": Arch(8192, 80, 64, 8, 28672, 32000),
    "smollm2-135m": Arch(576, 30, 9, 3, 1536, 49152, tied=True),
}
# Hub names whose config.json ships in configs/recipes/shapes/ (Meta's published shapes), so that `fishds plan
# --config` works offline on the recipes: Llama-3 8B and 70B (128,256-token vocabulary, grouped-query attention)
SHAPES_DIR = Path(__file__).resolve().parents[1] / "configs" / "recipes" / "shapes"
HUB_SHAPES = {
    "meta-llama/Meta-Llama-3-8B": "llama-3-8b",
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama-3-8b",
    "meta-llama/Meta-Llama-3-70B": "llama-3-70b",
    "meta-llama/Meta-Llama-3-70B-Instruct": "llama-3-70b",
}


def load_arch(model: str) -> Arch:
    """A preset name, a config.json, or a folder holding one."""
    if model in PRESETS:
        return PRESETS[model]
    p = Path(model)
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file():
        raise ValueError(f"{model!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json / model folder")
    c = json.loads(p.read_text())
    heads = c["num_attention_heads"]
    return Arch(
        c["hidden_size"],
        c["num_hidden_layers"],
        heads,
        c.get("num_key_value_heads") or heads,
        c["intermediate_size"],
        c["vocab_size"],
        bool(c.get("tie_word_embeddings", False)),
        c.get("head_dim"),
    )


@dataclass
class Setup:
    zero: int = 3
    world: int = 1
    quant_bits: int | None = None
    double_quant: bool = False
    precision: str = "bf16"
    r: int = 8
    targets: tuple[str, ...] | str = "all-linear"
    keep_ratio: float | None = None  # None: plain PEFT, no masks
    optimizer: str = "adamw"
    micro_batch: int = 1
    seq_len: int = 2048
    compact: bool = False  # fish.compact_optimizer: AdamW moments (+ int32 index) for the selected entries only
    loss_impl: str = "chunked"  # train.loss_impl (auto plans as chunked: liger is lighter still where it runs)
    loss_chunk: int | None = None  # train.loss_chunk_tokens


def _targets(s: Setup) -> tuple[str, ...]:
    return PROJ if s.targets == "all-linear" else tuple(s.targets)


def plan(arch: Arch, s: Setup) -> dict:
    """Bytes per rank of every component, and totals with and without gradient checkpointing."""
    p = 4 if s.precision == "fp32" else 2
    W, z = s.world, s.zero
    shapes = arch.shapes()
    lin = arch.layers * sum(i * o for i, o in shapes.values())
    other = arch.vocab * arch.hidden * (1 if arch.tied else 2) + (2 * arch.layers + 1) * arch.hidden
    if s.quant_bits == 4:
        blocks = lin / 64
        qstate = blocks + blocks / 256 * 4 if s.double_quant else blocks * 4
        qstate += arch.layers * len(shapes) * (64 + (1024 if s.double_quant else 0))  # code tables per layer
        frozen = (lin / 2 + other * p) / (W if z == 3 else 1) + qstate
        frozen_full = lin / 2 + other * p + qstate
        largest_linear = max(i * o for i, o in shapes.values()) / 2
    else:
        frozen = (lin + other) * p / (W if z == 3 else 1)
        frozen_full = (lin + other) * p
        largest_linear = max(i * o for i, o in shapes.values()) * p
    tgt = _targets(s)
    n = arch.layers * sum(s.r * (shapes[t][0] + shapes[t][1]) for t in tgt)
    masters_split = W if (z >= 1 or s.precision == "bf16") else 1
    compact = s.compact and s.keep_ratio is not None and s.optimizer == "adamw"
    out = {
        "frozen": frozen,
        "adapter": n * p / (W if z == 3 else 1),
        "gradients": n * p / (W if z >= 2 else 1),
        "optimizer": (0 if (z == 0 and s.precision == "fp32") else 4 * n / masters_split)
        + (12 * s.keep_ratio if compact else 8 if s.optimizer == "adamw" else 4) * n / masters_split,
        "masks": 0 if s.keep_ratio is None else n / 8,
        "mask_restore": 0 if s.keep_ratio is None or compact else 4 * n * (1 - s.keep_ratio) / masters_split,
        "largest_gathered": max(arch.vocab * arch.hidden * p, largest_linear) if z == 3 else 0,
    }
    tokens, a = s.micro_batch * s.seq_len, p
    one_layer = tokens * (7 * arch.hidden + 3 * arch.kv + 4 * arch.intermediate + s.r * len(tgt)) * a
    out["loss"] = loss_bytes(arch, s)
    out["loss_impl"] = s.loss_impl
    out["activations"] = arch.layers * one_layer + out["loss"]
    out["activations_gc"] = arch.layers * tokens * arch.hidden * a + one_layer + out["loss"]
    states = sum(
        out[k] for k in ("frozen", "adapter", "gradients", "optimizer", "masks", "mask_restore", "largest_gathered")
    )
    out["model_states"] = states
    out["measurable"] = sum(out[k] for k in ("frozen", "adapter", "optimizer", "masks", "mask_restore"))  # memory.py
    out["total"] = states + out["activations"]
    out["total_gc"] = states + out["activations_gc"]
    out["adapter_entries"] = n
    # transformers 5.x loads a quantized model whole on every rank (no zero.Init); DeepSpeed partitions it at
    # initialize, so until then each rank holds the full 4-bit backbone (host memory without a device_map)
    out["load_peak"] = frozen_full if (s.quant_bits == 4 or z != 3) else 0
    return out


def loss_bytes(arch: Arch, s: Setup) -> float:
    """Bytes of the loss path per rank for one micro-batch (module docstring, by train.loss_impl)."""
    from .run.loss import LossPath

    a, tokens, V = (4 if s.precision == "fp32" else 2), s.micro_batch * s.seq_len, arch.vocab
    if s.loss_impl == "full":
        return tokens * V * (a + 8)
    if s.loss_impl == "liger":
        return tokens * arch.hidden * (a + 4)
    if s.loss_impl == "cce":
        return tokens * (arch.hidden * a + 8)
    c = min(tokens, LossPath(chunk_tokens=s.loss_chunk).chunk(V))
    return c * V * (a + 12) + s.micro_batch * V * a


def table(res: dict, unit: float = 2**30, label: str = "GiB") -> str:
    rows = [
        ("frozen weights", "frozen"),
        ("adapter", "adapter"),
        ("gradients", "gradients"),
        ("optimizer state", "optimizer"),
        ("masks (1 bit per entry)", "masks"),
        ("frozen-entry copies (enforcer)", "mask_restore"),
        ("largest gathered layer", "largest_gathered"),
        (f"loss path ({res.get('loss_impl', 'chunked')})", "loss"),
        ("activations (no checkpointing)", "activations"),
        ("activations (checkpointing)", "activations_gc"),
        ("total (no checkpointing)", "total"),
        ("total (checkpointing)", "total_gc"),
    ]
    lines = [f"{name:<32}{res[k] / unit:>12.3f} {label}" for name, k in rows]
    if res["load_peak"]:
        lines.append(
            f"{'backbone held while loading':<32}{res['load_peak'] / unit:>12.3f} {label}  (before "
            "deepspeed.initialize; under ZeRO-3 only a 4-bit backbone is loaded whole on every rank)"
        )
    return "\n".join(lines)


def add_arguments(ap) -> None:
    """The `fishds plan` options."""
    ap.add_argument("model", nargs="?", help=f"a preset ({', '.join(PRESETS)}), a config.json, or a model folder")
    ap.add_argument(
        "--config",
        help="plan a fishds run config instead (model, peft, quant, fish, train, "
        "data.max_length); "
        "only --world, --ds_config and --set apply then",
    )
    ap.add_argument("--ds_config", help="with --config: the DeepSpeed JSON (its ZeRO stage)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="with --config: an override")
    ap.add_argument("--zero", type=int, default=3, choices=(0, 1, 2, 3))
    ap.add_argument("--world", type=int, default=1, help="ranks (GPUs) in all")
    ap.add_argument("--quant", type=int, default=None, choices=(4,), help="4: QLoRA backbone")
    ap.add_argument("--double_quant", action="store_true")
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    ap.add_argument("--r", type=int, default=8, help="LoRA rank")
    ap.add_argument("--targets", default="all-linear", help="all-linear or a comma list, e.g. q_proj,v_proj")
    ap.add_argument("--keep_ratio", type=float, default=None, help="FISH keep ratio (omit for plain LoRA)")
    ap.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    ap.add_argument("--compact", action="store_true", help="fish.compact_optimizer (needs --keep_ratio, adamw)")
    ap.add_argument("--micro_batch", type=int, default=1)
    ap.add_argument("--seq_len", type=int, default=2048)
    ap.add_argument(
        "--loss_impl", default="chunked", choices=("chunked", "full", "liger", "cce"), help="train.loss_impl"
    )
    ap.add_argument("--loss_chunk_tokens", type=int, default=None, help="train.loss_chunk_tokens")


def from_config(cfg, ds_path: str | None, world: int) -> tuple[Arch, Setup]:
    """The plan of a fishds run config (no weights read): LoRA-family methods only."""
    from .config import ConfigError
    from .dsconfig import resolve_ds_config
    from .fish.selection import rule
    from .methods import METHODS
    from .model import resolve_model_path

    if not METHODS[cfg.peft.method].lora_shapes:
        raise ConfigError(f"peft.method={cfg.peft.method!r}: fishds plan models LoRA-family adapters only")
    t = cfg.peft.target_modules
    targets = "all-linear" if t == "all-linear" else tuple(x for x in ([t] if isinstance(t, str) else t) if x in PROJ)
    keep = None if rule(cfg.fish.selection).dense else (cfg.fish.keep_ratio or 0.5)
    shape = HUB_SHAPES.get(cfg.model.name_or_path)
    model_path = str(SHAPES_DIR / shape) if shape else resolve_model_path(cfg.model)
    ds = resolve_ds_config(cfg, ds_path or cfg.ds_config, world, model_path)
    return load_arch(model_path), Setup(
        ds["zero_optimization"].get("stage", 0),
        world,
        cfg.quant.bits,
        cfg.quant.double_quant,
        cfg.train.precision,
        cfg.peft.r,
        targets,
        keep,
        cfg.train.optimizer,
        cfg.train.micro_batch_size,
        cfg.data.max_length,
        cfg.fish.compact_optimizer,
        "chunked" if cfg.train.loss_impl == "auto" else cfg.train.loss_impl,
        cfg.train.loss_chunk_tokens,
    )


def from_args(args) -> tuple[Arch, Setup]:
    if args.config:
        from .config import load_config

        return from_config(load_config(args.config, args.set), args.ds_config, args.world)
    if not args.model:
        raise ValueError("give MODEL (a preset, config.json or model folder) or --config")
    targets = args.targets if args.targets == "all-linear" else tuple(t for t in args.targets.split(",") if t)
    bad = [t for t in ([] if targets == "all-linear" else targets) if t not in PROJ]
    if bad:
        raise ValueError(f"--targets: {bad} are not Llama projections ({', '.join(PROJ)})")
    if args.keep_ratio is not None and not 0 < args.keep_ratio <= 1:
        raise ValueError(f"--keep_ratio {args.keep_ratio} is outside (0, 1]")
    return load_arch(args.model), Setup(
        args.zero,
        args.world,
        args.quant,
        args.double_quant,
        args.precision,
        args.r,
        targets,
        args.keep_ratio,
        args.optimizer,
        args.micro_batch,
        args.seq_len,
        args.compact,
        args.loss_impl,
        args.loss_chunk_tokens,
    )
