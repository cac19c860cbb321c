"""Per-shard work of `prepare` and `caption` as Prefect tasks on a Dask task runner (prefect-dask).

The components decide what a shard is and join the results (`components.prepare.prepare_shard`,
`components.captioner.caption_shard`); they take a `map_shards(fn, calls)` argument and know
nothing of Prefect or Dask. The stage commands (`zoetrope stage prepare|caption`, run by DVC)
pass `mapper(cfg.dask, stage)`: each call becomes one task of a sub-flow `zoetrope-shards`,
whose task runner is a `DaskTaskRunner` on

- a `LocalCluster` of `dask.workers` workers (processes, or threads with `dask.processes: false`)
  started for the stage and closed after it, when `dask.address` is "" (the default);
- the running scheduler at `dask.address` (`tcp://HOST:8786`) otherwise. Its workers need this
  project installed and the project folder at the same path (a shared filesystem): a call names
  its files, it does not carry them.

The sub-flow reports to the pipeline's Prefect server (the pipeline passes PREFECT_API_URL to its
stage commands); run alone (`dvc repro`), the stage starts one temporary server and hands its
address to the workers, so they do not each start their own. `dask.enabled: false` runs the same
calls in a plain loop.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Any, Callable

from prefect import flow, tags, task
from prefect.cache_policies import NO_CACHE

from components.config import DaskConfig


def _target(fn: Callable) -> str:
    return f"{fn.__module__}:{fn.__qualname__}"


def _resolve(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


# No cache policy: a shard's inputs are files, not its arguments, so an input hash would lie;
# DVC already decides whether the stage runs at all.
@task(name="shard", task_run_name="{label}", cache_policy=NO_CACHE)
def run_shard(target: str, kwargs: dict, label: str) -> Any:
    return _resolve(target)(**kwargs)


@flow(name="zoetrope-shards", flow_run_name="{stage}-shards", log_prints=True)
def map_shards_flow(stage: str, target: str, calls: list[dict]) -> list:
    """Submit one task per shard to the flow's task runner; results in call order."""
    futures = [run_shard.submit(target, kwargs, f"{stage}-shard-{i:05d}") for i, kwargs in enumerate(calls)]
    return [f.result() for f in futures]


def task_runner(cfg: DaskConfig):
    """The DaskTaskRunner `cfg` names: the remote scheduler, or a local cluster."""
    from prefect_dask import DaskTaskRunner

    if cfg.address:
        return DaskTaskRunner(address=cfg.address)
    workers = cfg.workers or os.cpu_count() or 1
    # One thread per worker: the per-shard work is decoding and small PyTorch models, which gain
    # more from separate workers than from threads sharing one interpreter.
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1,
                                          "processes": cfg.processes, "dashboard_address": None})


@contextlib.contextmanager
def _shared_api():
    """An API address every Dask worker can reach: the one set, or one temporary server's."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    # Prefect's default of 20 s is short on a busy machine (measured: BENCHMARKS.md).
    server.start(timeout=max(60, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield server.api_url


def mapper(cfg: DaskConfig, stage: str) -> Callable[[Callable, list[dict]], list] | None:
    """The `map_shards` argument for a component: a Dask map, or None (the component's plain loop)."""
    if not cfg.enabled:
        return None

    def map_shards(fn: Callable, calls: list[dict]) -> list:
        with _shared_api(), tags("zoetrope", stage):
            return map_shards_flow.with_options(task_runner=task_runner(cfg))(stage, _target(fn), calls)

    return map_shards
