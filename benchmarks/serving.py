"""Serving benchmark: ONNX Runtime vs eager PyTorch, adaptive batching, memory, a load test.

    python benchmarks/serving.py                     # the project's trained models (models/...)
    python benchmarks/serving.py --tiny              # an untrained tiny model: a smoke test only
    python benchmarks/serving.py --json-out r.json   # also write the figures as JSON

Measures, for one model:
1. generation latency p50/p95 of one video, ONNX Runtime (`OnnxT2V`, CUDA provider where a GPU
   exists) against eager PyTorch (`T2VPipeline`, on CUDA where a GPU exists), same prompt, seed
   and sampling settings. ONNX Runtime runs the serving bundle as the service does: the split
   DiT (`dit_condition.onnx` once, `dit_step.onnx` per step) where the bundle has it, and is
   also timed with the single `dit.onnx` graph for reference. PyTorch runs the model as a user
   would, `T2VPipeline.generate` (DiT.forward every step). Runs are interleaved (one of each
   backend in turn), so drifting load on a shared machine hits every backend alike;
2. service throughput (videos/s) with 1 client against 8 concurrent clients, through a real
   `bentoml serve` (adaptive batching shares the DiT loop between concurrent requests);
3. the service's peak RSS (the server process tree, sampled every 50 ms during the load);
4. a load test: `--requests` requests at concurrency `--concurrency`, counting errors.
Prints a markdown table. Run it on a quiet machine: every figure is wall-clock.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "a large red circle moving left quickly on a black background"


def percentiles(seconds: list[float], cpu: list[float] | None = None) -> dict:
    a = np.asarray(seconds)
    out = {"p50_s": float(np.percentile(a, 50)), "p95_s": float(np.percentile(a, 95)), "n": len(a)}
    if cpu is not None:  # CPU seconds of this process: what a call costs, whatever else runs
        out["cpu_p50_s"] = float(np.percentile(np.asarray(cpu), 50))
    return out


def timed(fn, runs: int, warmup: int = 1) -> list[float]:
    return interleaved({"fn": fn}, runs, warmup)[0]["fn"]


def interleaved(fns: dict, runs: int, warmup: int = 1) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds per call of each function, called in turn `runs` times after `warmup` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


# ----------------------------------------------------------------------------------------------
# 1. Latency: ONNX Runtime vs eager PyTorch
# ----------------------------------------------------------------------------------------------


def latency(bundle: Path, vae: Path, dit: Path, max_tokens: int, runs: int, steps: int | None,
            threads: int) -> dict:
    """Both backends at 1 CPU thread and at `threads`; the speed-up compares each at its fastest."""
    import torch

    from components.generate import T2VPipeline
    from components.onnx_runtime import OnnxT2V, has_gpu

    counts = sorted({1, threads})
    runtimes = {n: OnnxT2V(bundle, threads=n) for n in counts}
    runtime = runtimes[1]  # a service lane: one intra-op thread (serving/batching.py)
    steps = steps or runtime.info.steps
    guidance, sampler = runtime.info.guidance, runtime.info.sampler
    device = "cuda" if has_gpu() and torch.cuda.is_available() else "cpu"
    pipe = T2VPipeline.from_paths(vae, dit, max_tokens, device)

    def run_torch(n: int):
        def run():
            torch.set_num_threads(n)
            pipe.generate([PROMPT], [0], steps=steps, guidance=guidance, sampler=sampler)
            if device == "cuda":
                torch.cuda.synchronize()
        return run

    fns = {}
    for n in counts:
        fns[f"onnxruntime_t{n}"] = (lambda r: lambda: r.generate(PROMPT, seed=0, steps=steps))(runtimes[n])
        fns[f"pytorch_t{n}"] = run_torch(n)
    single = None
    if runtime.split_dit:
        single = OnnxT2V(bundle, threads=1, split_dit=False, precision=runtime.precision)
        fns["single_graph"] = lambda: single.generate(PROMPT, seed=0, steps=steps)
    batch = 8  # what one batched loop of a lane costs per video, against one video alone
    fns[f"batch_{batch}"] = lambda: runtime.generate_batch([PROMPT] * batch, list(range(batch)), steps=steps)
    seconds, cpu = interleaved(fns, runs)
    torch.set_num_threads(threads)
    by_threads = {name: {**percentiles(seconds[name], cpu[name])} for name in fns if "_t" in name}
    best_ort = min((k for k in by_threads if k.startswith("onnxruntime")), key=lambda k: by_threads[k]["p50_s"])
    best_pt = min((k for k in by_threads if k.startswith("pytorch")), key=lambda k: by_threads[k]["p50_s"])
    out = {"onnxruntime": {**by_threads[best_ort], "threads": int(best_ort.split("_t")[1]),
                           "provider": runtime.provider, "precision": runtime.precision,
                           "dit_graphs": runtime.describe()["dit_graphs"]},
           "pytorch": {**by_threads[best_pt], "threads": int(best_pt.split("_t")[1]), "device": device},
           "by_threads": by_threads, "steps": steps, "threads": threads,
           "same_threads_speedup_p50": {n: by_threads[f"pytorch_t{n}"]["p50_s"] / by_threads[f"onnxruntime_t{n}"]["p50_s"]
                                        for n in counts},
           "onnxruntime_batch": {**percentiles(seconds[f"batch_{batch}"], cpu[f"batch_{batch}"]), "batch": batch,
                                 "threads": 1}}
    if single is not None:
        out["onnxruntime_single_graph"] = {**percentiles(seconds["single_graph"], cpu["single_graph"]),
                                           "dit_graphs": "dit", "threads": 1}
    if runtime.provider == "CUDAExecutionProvider" and runtime.precision == "fp16":
        fp32 = OnnxT2V(bundle, precision="fp32", threads=threads)
        out["onnxruntime_fp32"] = {**percentiles(timed(lambda: fp32.generate(PROMPT, seed=0, steps=steps), runs)),
                                   "provider": fp32.provider, "precision": "fp32"}
    out["speedup_p50"] = out["pytorch"]["p50_s"] / out["onnxruntime"]["p50_s"]
    return out


# ----------------------------------------------------------------------------------------------
# 2-4. The service over HTTP
# ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def service(bundle: Path, log: Path):
    import httpx

    port = _free_port()
    env = dict(os.environ, ZOETROPE_BUNDLE=str(bundle), BENTOML_DO_NOT_TRACK="true", DO_NOT_TRACK="1",
               BENTOML_HOME=str(log.parent / "bentoml"), PYTHONPATH=str(ROOT))
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "serving.service:TextToVideo",
                                 "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited: {log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"bentoml serve not ready in 300 s: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url, proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class PeakRSS:
    """Peak resident memory of a process and its children, sampled in a thread."""

    def __init__(self, pid: int, every_s: float = 0.05):
        import psutil

        self.proc, self.every_s, self.peak = psutil.Process(pid), every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            with contextlib.suppress(psutil.Error):
                for p in [self.proc, *self.proc.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def load(url: str, requests: int, concurrency: int, steps: int | None) -> dict:
    """`requests` generations from `concurrency` clients; -> videos/s, errors, latency percentiles."""
    import httpx

    body = {"prompt": PROMPT}
    if steps:
        body["steps"] = steps
    errors: list[str] = []
    latencies: list[float] = []
    local = threading.local()  # one keep-alive connection per client thread, as a real client holds
    clients: list = []

    def one(i: int) -> None:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=600)
            clients.append(local.client)
        t0 = time.perf_counter()
        try:
            r = local.client.post(f"{url}/generate", json={**body, "seed": i})
            if r.status_code != 200 or not r.content:
                errors.append(f"{r.status_code}: {r.text[:200]}")
                return
        except httpx.HTTPError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            return
        latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    for client in clients:
        client.close()
    out = {"requests": requests, "concurrency": concurrency, "errors": len(errors), "wall_s": wall,
           "videos_per_s": (requests - len(errors)) / wall, "first_errors": errors[:3]}
    if latencies:
        out.update(percentiles(latencies))
    return out


def serve_figures(bundle: Path, tmp: Path, throughput_requests: int, requests: int, concurrency: int,
                  steps: int | None) -> dict:
    import httpx

    with service(bundle, tmp / "server.log") as (url, pid), PeakRSS(pid) as rss:
        load(url, 2, 1, steps)  # warm the worker up
        one = load(url, throughput_requests, 1, steps)
        many = load(url, throughput_requests, concurrency, steps)
        soak = load(url, requests, concurrency, steps)
        info = httpx.get(f"{url}/info", timeout=10).json()
    return {"one_client": one, "concurrent": many, "load_test": soak, "peak_rss_bytes": rss.peak,
            "provider": info["provider"], "lanes": info["batching"]["lanes"],
            "batch_sizes_seen": sorted(set(info["batching"]["recent_batch_sizes"])),
            "throughput_gain": many["videos_per_s"] / one["videos_per_s"]}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def table(r: dict) -> str:
    lat, srv = r["latency"], r["service"]
    rows = [
        ("machine", r["machine"]),
        ("model", r["model"]),
        ("load average (1 min) at start / end", r["load"]),
    ]
    for name, fig in lat["by_threads"].items():
        backend, n = name.split("_t")
        label = (f"ONNX Runtime ({lat['onnxruntime']['provider']}, {lat['onnxruntime']['precision']}, "
                 f"{lat['onnxruntime']['dit_graphs']})" if backend == "onnxruntime"
                 else f"eager PyTorch ({lat['pytorch']['device']})")
        rows.append((f"latency p50 / p95 (CPU s p50), {label}, {n} thread(s)",
                     f"{fig['p50_s']:.3f} s / {fig['p95_s']:.3f} s ({fig['cpu_p50_s']:.3f} s)"))
    if "onnxruntime_single_graph" in lat:
        rows.append(("latency p50 / p95, ONNX Runtime, single dit.onnx every step, 1 thread (reference)",
                     f"{lat['onnxruntime_single_graph']['p50_s']:.3f} s / "
                     f"{lat['onnxruntime_single_graph']['p95_s']:.3f} s"))
    if "onnxruntime_fp32" in lat:
        rows.append(("latency p50 / p95, ONNX Runtime (CUDA, fp32)",
                     f"{lat['onnxruntime_fp32']['p50_s']:.3f} s / {lat['onnxruntime_fp32']['p95_s']:.3f} s"))
    same = ", ".join(f"{v:.2f}x at {n} thread(s)" for n, v in lat["same_threads_speedup_p50"].items())
    rows += [
        ("ONNX Runtime speed-up (p50), each backend at its fastest thread count",
         f"{lat['speedup_p50']:.2f}x (ORT {lat['onnxruntime']['threads']} thread(s) against PyTorch "
         f"{lat['pytorch']['threads']}; {lat['onnxruntime']['n']} runs, {lat['steps']} steps)"),
        ("ONNX Runtime speed-up (p50), same threads", same),
        (f"ONNX Runtime, one batch of {lat['onnxruntime_batch']['batch']} videos, 1 thread: wall / CPU per video",
         f"{lat['onnxruntime_batch']['p50_s'] / lat['onnxruntime_batch']['batch']:.3f} s / "
         f"{lat['onnxruntime_batch']['cpu_p50_s'] / lat['onnxruntime_batch']['batch']:.3f} s"),
        ("service throughput, 1 client", f"{srv['one_client']['videos_per_s']:.2f} videos/s"),
        (f"service throughput, {srv['concurrent']['concurrency']} clients (adaptive batching)",
         f"{srv['concurrent']['videos_per_s']:.2f} videos/s"),
        ("throughput gain", f"{srv['throughput_gain']:.2f}x ({srv['lanes']} lanes; batch sizes seen: "
                            f"{srv['batch_sizes_seen']})"),
        ("service peak RSS (process tree)", f"{srv['peak_rss_bytes'] / 2**20:.0f} MiB"),
        (f"load test: {srv['load_test']['requests']} requests at concurrency {srv['load_test']['concurrency']}",
         f"{srv['load_test']['errors']} errors, {srv['load_test']['wall_s']:.1f} s, "
         f"p50 {srv['load_test'].get('p50_s', float('nan')):.2f} s / p95 {srv['load_test'].get('p95_s', float('nan')):.2f} s"),
    ]
    lines = ["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="benchmark an untrained tiny model (smoke test)")
    p.add_argument("--bundle", type=Path, default=ROOT / "models/onnx")
    p.add_argument("--vae", type=Path, default=ROOT / "models/vae/vae.pt")
    p.add_argument("--dit", type=Path, default=ROOT / "models/dit/dit.pt")
    p.add_argument("--runs", type=int, default=20, help="timed generations per backend")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the bundle's)")
    p.add_argument("--throughput-requests", type=int, default=32)
    p.add_argument("--requests", type=int, default=200, help="load-test requests")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="CPU threads for ORT and torch in the latency comparison (default: all)")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="zoetrope-bench-") as tmp:
        tmp = Path(tmp)
        if args.tiny:
            from tests.test_onnx_runtime import export_tiny_bundle

            tiny = export_tiny_bundle(tmp / "tiny")
            bundle, vae, dit, max_tokens, model = tiny.bundle, tiny.vae, tiny.dit, tiny.max_tokens, "tiny untrained"
        else:
            for path in (args.bundle / "bundle.json", args.vae, args.dit):
                if not path.exists():
                    print(f"{path} not found: run the pipeline first (zoetrope run), pass --bundle/--vae/--dit, "
                          "or use --tiny for a smoke test", file=sys.stderr)
                    return 2
            bundle, vae, dit, model = args.bundle, args.vae, args.dit, f"trained ({args.bundle})"
            max_tokens = json.loads((bundle / "bundle.json").read_text())["max_tokens"]
        load_start = os.getloadavg()[0]
        report = {
            "machine": f"{platform.node()}, {os.cpu_count()} CPUs",
            "model": model,
            "latency": latency(bundle, vae, dit, max_tokens, args.runs, args.steps, args.threads),
            "service": serve_figures(bundle, tmp, args.throughput_requests, args.requests, args.concurrency,
                                     args.steps),
        }
        report["load"] = f"{load_start:.2f} / {os.getloadavg()[0]:.2f}"
    try:
        import torch

        if torch.cuda.is_available():
            report["machine"] += f", {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    print(table(report))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["service"]["load_test"]["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
