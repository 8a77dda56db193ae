"""GPU benchmark of the builder and the harvest copy path that needs torch only (issue 12).

The GPU machines lent to this project have torch, transformers, numpy, scipy and pyarrow,
but neither Lance nor DuckDB: this script imports only the pure-torch modules of ep_store
(leader, calibrate, hostcopy). In one run it measures

- the bf16 and fp32 matmul peaks (8192^3; 1024^3 with --small);
- builder tokens/s and share of the screening dtype's peak in the steady state at width
  2,304, theta 0.2, about 0.2% new regions per batch: K0 in {16,384, 131,072} exemplars
  already built, batch in {2,048, 8,192}, bf16 and fp32 screening;
- exactness against the sequential rule (ep_store.kernels.leader.leader_reference) on real stored
  activations passed in as a .npy (export them with pipelines/export_activations.py), at
  p=1 and p=10, both precisions;
- the harvest's forward and copy path on a random-init model of the Gemma-2-2B shape (bf16,
  forward to block 12): forward time, the naive host conversion and the device-side
  conversion with pinned non-blocking copies (ep_store.stages.hostcopy).

    python -m pipelines.export_activations --store data/store --activations gemma-3-270m/base/L6 \\
        --tokens 40960 --out data/bench/L6.npy                          # where Lance is
    PYTHONPATH=. python pipelines/bench/bench_gpu.py --npy data/bench/L6.npy   # on the GPU
    PYTHONPATH=. python pipelines/bench/bench_gpu.py --small                   # CPU, CI

Writes data/metrics/bench_gpu.json (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

try:
    import ep_store  # noqa: F401
except ImportError:  # run as a script from a checkout without PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ep_store import jsonio  # noqa: E402
from ep_store.kernels.calibrate import batch_percentile, calibrate, unit_directions  # noqa: E402
from ep_store.kernels.leader import LeaderBuilder, LeaderState, leader_reference  # noqa: E402
from ep_store.stages.hostcopy import to_host  # noqa: E402

FULL = {"peak_n": 8192, "width": 2304, "k0": [16_384, 131_072], "batch": [2048, 8192], "batches": 6,
        "exact_tokens": 40_960, "model": dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                              num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                              vocab_size=256_000),
        "harvest_layer": 12, "harvest_batch": (16, 256)}
SMALL = {"peak_n": 512, "width": 128, "k0": [256, 640], "batch": [128, 256], "batches": 2,
         "exact_tokens": 2000, "model": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                             num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                             vocab_size=512),
         "harvest_layer": 1, "harvest_batch": (2, 32)}
THETA = 0.2
NEW_SHARE = 0.002


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 1) -> float:
    """Seconds per call after one warm-up call."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def matmul_peaks(n: int, device: torch.device) -> dict[str, float]:
    """TFLOP/s of an n x n x n product in bf16 and fp32."""
    peaks = {}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        peaks[name] = 2.0 * n**3 / timed(lambda a=a, b=b: a @ b, device, repeats=5) / 1e12
    return peaks


def steady_stream(E_KD: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Tokens at cosine 0.9 of a random exemplar (covered at theta 0.2), and a share
    NEW_SHARE of fresh random directions (in high width, new regions)."""
    g = torch.Generator(device=E_KD.device).manual_seed(seed)
    d = E_KD.shape[1]
    anchor = E_KD[torch.randint(0, E_KD.shape[0], (n,), generator=g, device=E_KD.device)]
    noise = torch.nn.functional.normalize(torch.randn(n, d, generator=g, device=E_KD.device), dim=1)
    u = 0.9 * anchor + (1 - 0.81) ** 0.5 * noise
    fresh = torch.rand(n, generator=g, device=E_KD.device) < NEW_SHARE
    u[fresh] = noise[fresh]
    return torch.nn.functional.normalize(u, dim=1)


def builder_steady_state(cfg: dict, peaks: dict, device: torch.device) -> list[dict]:
    rows = []
    d = cfg["width"]
    for k0 in cfg["k0"]:
        g = torch.Generator(device=device).manual_seed(k0)
        E = torch.nn.functional.normalize(torch.randn(k0, d, generator=g, device=device), dim=1)
        for batch in cfg["batch"]:
            u = steady_stream(E, batch * (cfg["batches"] + 1), seed=batch)
            for precision in ("bfloat16", "float32"):
                state = LeaderState(width=d, exemplars_KD=E.cpu(), source_row_K=torch.arange(k0),
                                    member_count_K=torch.zeros(k0, dtype=torch.long),
                                    direction_sum_KD=torch.zeros(k0, d, dtype=torch.float64))
                builder = LeaderBuilder(THETA, batch, 10**9, state, device, precision)
                builder.feed(u[:batch])  # warm-up batch
                sync(device)
                flops0, new0 = builder.screen_flops, builder.state.regions
                start = time.perf_counter()
                builder.feed(u[batch:])
                sync(device)
                seconds = time.perf_counter() - start
                tflops = (builder.screen_flops - flops0) / seconds / 1e12
                rows.append({"k0": k0, "batch": batch, "precision": precision,
                             "tokens_per_s": round(batch * cfg["batches"] / seconds, 1),
                             "screen_tflops": round(tflops, 3), "share_of_peak": round(tflops / peaks[precision], 3),
                             "new_regions": builder.state.regions - new0, "rechecked_rows": builder.rechecked})
    return rows


def exactness(npy: Path, tokens: int, device: torch.device) -> list[dict]:
    """The builder's exemplar list against the sequential rule on real activations."""
    import numpy as np

    x = torch.from_numpy(np.load(npy)[:tokens].astype(np.float32))
    half = x.shape[0] // 2
    out = []
    for p in (1.0, 10.0):
        center = calibrate([x[:half], x[half:]], p).center_D
        u = unit_directions(x, center)
        theta = float(np.mean([batch_percentile(u[i : i + 2048], p) for i in range(0, u.shape[0] - 1, 2048)
                               if u[i : i + 2048].shape[0] >= 2]))
        start = time.perf_counter()
        ref = leader_reference(u, theta, 2048, 1)
        ref_s = time.perf_counter() - start
        entry = {"percentile": p, "tokens": int(x.shape[0]), "theta": round(theta, 5),
                 "regions": len(ref.exemplar_rows), "reference_tokens_per_s": round(u.shape[0] / ref_s, 1)}
        for precision in ("bfloat16", "float32"):
            builder = LeaderBuilder(theta, 2048, 1, LeaderState(width=u.shape[1]), device, precision)
            u_dev = u.to(device)
            sync(device)
            start = time.perf_counter()
            builder.feed(u_dev)
            state = builder.finish("end_of_stream")
            sync(device)
            entry[precision] = {"identical": state.source_row_K.tolist() == ref.exemplar_rows
                                and state.new_per_batch == ref.new_per_batch,
                                "tokens_per_s": round(state.tokens / (time.perf_counter() - start), 1)}
        out.append(entry)
    return out


def harvest_path(cfg: dict, device: torch.device) -> dict:
    """Forward to block ``harvest_layer`` of a random-init Gemma-2 shaped model, then the
    block to the host as float16 two ways."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(Gemma2Config(**cfg["model"]), torch_dtype=dtype).to(device).eval()
    batch, length = cfg["harvest_batch"]
    ids = torch.randint(0, cfg["model"]["vocab_size"], (batch, length), device=device)
    kept = {}

    class Stop(Exception):
        pass

    def hook(module, args, output):
        kept["x"] = output[0] if isinstance(output, tuple) else output
        raise Stop

    handle = model.model.layers[cfg["harvest_layer"]].register_forward_hook(hook)

    def forward():
        with torch.inference_mode(), contextlib.suppress(Stop):
            model(input_ids=ids)

    try:
        forward_s = timed(forward, device, repeats=3)
    finally:
        handle.remove()
    x = kept["x"].reshape(-1, kept["x"].shape[-1])
    naive_s = timed(lambda: x.float().cpu().numpy().astype("float16"), device, repeats=3)
    fast_s = timed(lambda: to_host(x, torch.float16).wait(), device, repeats=3)
    same = bool(torch.equal(torch.from_numpy(to_host(x, torch.float16).numpy()), x.to(torch.float16).cpu()))
    tokens = batch * length
    return {"model": "gemma-2-2b shape (random init)" if cfg is FULL else "small gemma-2 shape (random init)",
            "layer": cfg["harvest_layer"], "tokens": tokens, "forward_s": round(forward_s, 5),
            "forward_tokens_per_s": round(tokens / forward_s, 1), "copy_naive_s": round(naive_s, 5),
            "copy_device_pinned_s": round(fast_s, 5), "copy_identical": same}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="Small shapes for a CPU (CI).")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--npy", type=Path, default=None, help="Real activations (N, D) for the exactness check.")
    ap.add_argument("--exact-tokens", type=int, default=None, help="Tokens of --npy to check (default by size).")
    ap.add_argument("--out", type=Path, default=Path("data/metrics/bench_gpu.json"))
    args = ap.parse_args(argv)
    cfg = SMALL if args.small else FULL
    device = torch.device(args.device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "small": args.small, "theta": THETA, "new_share": NEW_SHARE}
    peaks = matmul_peaks(cfg["peak_n"], device)
    result["matmul_peak_tflops"] = {k: round(v, 3) for k, v in peaks.items()}
    result["builder_steady_state"] = builder_steady_state(cfg, peaks, device)
    if args.npy is not None:
        result["exactness"] = exactness(args.npy, args.exact_tokens or cfg["exact_tokens"], device)
    result["harvest"] = harvest_path(cfg, device)
    # Proof of the torch-only promise: neither Lance nor DuckDB was imported.
    result["imported_lance_or_duckdb"] = sorted(m for m in sys.modules if m.split(".")[0] in ("lance", "duckdb"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    jsonio.write(args.out, result)
    print(jsonio.dumps(result), file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
