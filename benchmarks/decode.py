"""Decode speed and cache memory against context length: kimitune's GenerationCache and transformers' generate.

Both run the same randomly initialised weights in the same process (transformers' KimiLinearForCausalLM gets
kimitune's state dict: the in-memory names are the same). For each context length L, one prompt of L random
tokens, then ``--new-tokens`` greedy tokens:

- kimitune: ``GenerationCache.prefill`` (timed), then ``step`` per token, each token read back to the host;
  decode tokens/s = 1 / the median step time. The cache's bytes after decoding, split into the KDA layers'
  states and the MLA layers' latents (``CacheMemory``).
- transformers: ``generate(max_new_tokens=1 + n, min_new_tokens=1 + n)`` with a streamer noting when each token
  arrives: prefill = until the first new token; decode tokens/s = 1 / the median time between the tokens after
  it. Its cache's bytes (every tensor of ``past_key_values``, split by layer type).
- reference sizes at the same L, computed: "full MLA" = the same model with every layer MLA, caching the
  compressed latent per token (kv_lora_rank + qk_rope_head_dim values) as Kimi's MLA layers do; "full MHA" =
  every layer caching per-head keys and values (heads * (qk_head_dim + v_head_dim) values per token), what a
  standard attention layer of these head sizes caches. The release's "up to 75% less KV cache" is hybrid vs full
  MLA: 3 of 4 layers keep a constant-size state, so at long contexts the cache tends to 1/4.
- on the GPU every context runs twice for each implementation and the second run is reported; the first run's
  prefill and decode ("first ...") include one-time costs at a new length: Triton compiling a kernel
  specialisation, and cuDNN building an attention plan for each new key length (transformers' decode steps pay
  one per step on the first run; kimitune keeps cuDNN out of attention over a cache).

    python benchmarks/decode.py                            # CPU: 4-layer model of hidden 512, L = 256 .. 4096
    python benchmarks/decode.py --device cuda              # GPU: the 48B model's widths, 4 layers, L = 1k .. 128k
    python benchmarks/decode.py --contexts 1024,8192 --skip-transformers-above 32768 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date

import torch

from kimitune import KimiLinearConfig, KimiLinearForCausalLM
from kimitune.infer import GenerationCache

# CPU: small but not tiny (about 70M parameters). GPU: Kimi-Linear-48B-A3B's widths with 4 layers (KDA x3, MLA).
CPU_CONFIG = dict(
    vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, kda_layers=[1, 2, 3],
    full_attn_layers=[4], kda_num_heads=8, kda_head_dim=64, num_attention_heads=8, num_key_value_heads=8,
    kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, num_experts=16,
    num_experts_per_token=2, moe_intermediate_size=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
GPU_CONFIG = dict(num_hidden_layers=4, kda_layers=[1, 2, 3], full_attn_layers=[4], num_key_value_heads=32)
CPU_CONTEXTS = [256, 512, 1024, 2048, 4096]
GPU_CONTEXTS = [1024, 4096, 16384, 32768, 65536, 131072]
MIB = 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def tokens_per_s(times: list[float]) -> float:
    """1 / the median time between consecutive tokens (robust to a busy machine's stalls)."""
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    return 1.0 / gaps[len(gaps) // 2]


def tensor_bytes(obj, seen: set | None = None) -> int:
    """Bytes of every distinct tensor reachable from ``obj`` (containers and object attributes)."""
    seen = set() if seen is None else seen
    if torch.is_tensor(obj):
        key = (obj.untyped_storage().data_ptr(), obj.data_ptr(), tuple(obj.shape))
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, torch.device, torch.dtype, type)):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def reference_bytes(config: KimiLinearConfig, context: int, itemsize: int) -> dict[str, int]:
    """Cache bytes of the same model at ``context`` tokens if every layer were MLA (latent) or standard MHA."""
    layers = config.num_hidden_layers
    latent = config.kv_lora_rank + config.qk_rope_head_dim
    per_head = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
    return {"full_mla": layers * context * latent * itemsize, "full_mha": layers * context * per_head * itemsize}


@torch.no_grad()
def run_kimitune(model: KimiLinearForCausalLM, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> dict:
    cache = GenerationCache(model)
    sync(device)
    start = time.perf_counter()
    logits = cache.prefill([prompt.tolist()])
    sync(device)
    prefill = time.perf_counter() - start
    token = logits.argmax(-1)
    times = [time.perf_counter()]
    for _ in range(new_tokens):
        token = cache.step(token).argmax(-1)
        token.tolist()  # the token reaches the host, as a sampler needs it (and as generate's streamer does)
        times.append(time.perf_counter())
    memory = cache.memory()
    return {"prefill_s": prefill, "decode_tokens_per_s": tokens_per_s(times), "kda_cache_bytes": memory.kda_bytes,
            "mla_cache_bytes": memory.mla_bytes, "cache_bytes": memory.total_bytes}


class TokenClock:
    """A ``generate`` streamer that notes when each new token arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.no_grad()
def run_transformers(model, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> dict:
    clock = TokenClock()
    sync(device)
    start = time.perf_counter()
    out = model.generate(prompt[None], max_new_tokens=1 + new_tokens, min_new_tokens=1 + new_tokens,
                         do_sample=False, return_dict_in_generate=True, pad_token_id=0, streamer=clock)
    # times[0]: the prompt; times[1]: the first new token (after the prefill); then one per decode step.
    prefill = clock.times[1] - start
    layers = out.past_key_values.layers
    types = model.config.layer_types
    linear = sum(tensor_bytes(layer) for layer, kind in zip(layers, types) if kind == "linear_attention")
    full = sum(tensor_bytes(layer) for layer, kind in zip(layers, types) if kind != "linear_attention")
    return {"prefill_s": prefill, "decode_tokens_per_s": tokens_per_s(clock.times[1:]),
            "kda_cache_bytes": linear, "mla_cache_bytes": full, "cache_bytes": linear + full}


def build_models(device: torch.device, dtype: torch.dtype, with_transformers: bool):
    """kimitune's model (its own initialisation, seed 0) and transformers' with the same state dict."""
    import transformers

    values = CPU_CONFIG if device.type == "cpu" else GPU_CONFIG
    config = KimiLinearConfig(**values, dtype=str(dtype).removeprefix("torch."))
    torch.manual_seed(0)
    with torch.device(device):
        ours = KimiLinearForCausalLM(config).to(dtype).eval()
    theirs = None
    if with_transformers:
        hf_config = transformers.KimiLinearConfig(**config.to_dict())
        with torch.device(device):
            theirs = transformers.KimiLinearForCausalLM._from_config(hf_config, attn_implementation="sdpa",
                                                                     dtype=dtype)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        theirs.eval()
    return config, ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--contexts", help="comma-separated context lengths (default: per device)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip-transformers-above", type=int, default=None,
                        help="run transformers only up to this context length")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    contexts = [int(c) for c in args.contexts.split(",")] if args.contexts else (
        CPU_CONTEXTS if device.type == "cpu" else GPU_CONTEXTS)
    config, ours, theirs = build_models(device, dtype, not args.no_transformers)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'CPU'}, " \
        f"{torch.get_num_threads()} threads"
    print(f"# {date.today()} {name}; torch {torch.__version__}; {dtype}; "
          f"{sum(p.numel() for p in ours.parameters()) / 1e6:.0f}M parameters; {args.new_tokens} new tokens")
    header = ("context", "impl", "prefill s", "first prefill s", "decode tok/s", "first decode tok/s",
              "KDA cache MiB", "MLA cache MiB", "total MiB",
              "full-MLA MiB", "less than full MLA", "full-MHA MiB", "peak GPU MiB")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    results = []
    generator = torch.Generator().manual_seed(1)
    prompts = {context: torch.randint(3, config.vocab_size, (context,), generator=generator).to(device)
               for context in contexts}
    # Every context for kimitune, then every context for transformers: neither implementation's state (compiled
    # kernels, cuDNN plans, the caching allocator) is left in between the other's rows.
    runs = [("kimitune", run_kimitune, ours, contexts)]
    if theirs is not None:
        limit = args.skip_transformers_above
        runs.append(("transformers", run_transformers, theirs, [c for c in contexts if limit is None or c <= limit]))
    for impl, run, model, impl_contexts in runs:
        run(model, prompts[contexts[0]][:128], 4, device)  # untimed warm-up: kernel compilation, first plans
        for context in impl_contexts:
            refs = reference_bytes(config, context + args.new_tokens, itemsize)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                weights = torch.cuda.memory_allocated()
            try:
                # On the GPU a new length can first compile kernels (a prompt in several pieces continues a
                # cache: new Triton specialisations) or build attention plans: that first run's prefill is
                # reported apart, and the row is the second run.
                first = run(model, prompts[context], args.new_tokens, device) if device.type == "cuda" else None
                result = run(model, prompts[context], args.new_tokens, device)
                result["first_prefill_s"] = first["prefill_s"] if first else float("nan")
                result["first_decode_tokens_per_s"] = first["decode_tokens_per_s"] if first else float("nan")
            except torch.OutOfMemoryError as err:
                result = {"error": f"out of memory: {str(err).splitlines()[0]}"}
            if device.type == "cuda":
                result["peak_mib"] = (torch.cuda.max_memory_allocated() - weights) / MIB  # beyond what was there
            result.update(context=context, impl=impl, **refs)
            results.append(result)
            if args.json:  # after every row: a long run cut short keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"device": name, "dtype": str(dtype), "new_tokens": args.new_tokens,
                               "results": results}, f, indent=2)
            if "error" in result:
                print(f"| {context} | {impl} | {result['error']} |")
                continue
            print(f"| {context} | {impl} | {result['prefill_s']:.2f} | {result['first_prefill_s']:.2f} | "
                  f"{result['decode_tokens_per_s']:.1f} | {result['first_decode_tokens_per_s']:.1f} | "
                  f"{result['kda_cache_bytes'] / MIB:.2f} | {result['mla_cache_bytes'] / MIB:.2f} | "
                  f"{result['cache_bytes'] / MIB:.2f} | {refs['full_mla'] / MIB:.2f} | "
                  f"{1 - result['cache_bytes'] / refs['full_mla']:.1%} | {refs['full_mha'] / MIB:.1f} | "
                  f"{result.get('peak_mib', float('nan')):.0f} |",
                  flush=True)

if __name__ == "__main__":
    main()
