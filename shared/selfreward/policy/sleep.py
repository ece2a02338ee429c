"""vLLM's sleep mode around training: the policy gives its GPU to the trainer, then takes it back.

When the policy server and the trainer share one GPU (compose's default, the embedded mode on
a GPU machine), vLLM holds `gpu_memory_utilization` of it for weights and KV cache while a
training stage runs. With `policy.sleep_during_training` on, the drivers put every replica to
sleep before a training stage (SFT, DPO: `Stage.trains`) and wake them after it,
in a `finally` (a failed training wakes them too); the publish stage that follows then loads
and verifies the new adapter's fingerprint as it always does.

vLLM 0.32 (`vllm/entrypoints/serve/dev/sleep/api_router.py`, `vllm/v1/engine/core.py`):
- the server must be started with `--enable-sleep-mode` (CUDA only: vLLM refuses it on CPU) and
  `VLLM_SERVER_DEV_MODE=1` (the endpoints are development ones): `server_flags`, which the
  launcher adds where the run sleeps the policy (the embedded mode's own server, or
  `selfreward policy serve` with sleep on / shares_gpu_with_trainer set);
- `POST /sleep?level=1` offloads the weights (LoRA slots included) to CPU memory and discards
  the KV cache; requests in flight are aborted (its default mode), new ones are accepted and
  wait until `POST /wake_up`; `GET /is_sleeping` answers `{"is_sleeping": bool}`; a server
  without sleep mode answers 404 on all three (`SleepModeUnavailable`, naming the replica).

Before the wake-up the training's cached CUDA memory is released (`release_gpu_memory`): the
trainer ran in this process (the embedded mode, a trainer job's work-horse), and PyTorch's
caching allocator would otherwise keep what vLLM needs to map its weights again.

`sleep_during_training` resolves `auto`: on when the policy runs on cuda, training is not on
CPU and the trainer shares the policy's GPU (`policy.shares_gpu_with_trainer`; unset, it is
true where the embedded mode starts the server itself). The distributed mode cannot see where
its services run: the deployment says it (docker-compose.yml: TRAINER_SHARES_POLICY_GPU).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import time
from collections.abc import Iterator, Sequence

from selfreward.config import PolicyServerConfig, RunConfig, ServicesConfig
from selfreward.errors import ServiceError

log = logging.getLogger(__name__)
SLEEP_LEVEL = 1  # weights to CPU memory (woken in seconds, adapters kept), KV cache discarded
DEV_MODE_ENV = "VLLM_SERVER_DEV_MODE"
SLEEP_FLAG = "--enable-sleep-mode"


def sleep_during_training(
    policy: PolicyServerConfig, *, training_device: str = "auto", own_server: bool = True
) -> bool:
    """Whether the policy sleeps while a training stage runs (policy.sleep_during_training).

    `own_server`: the caller started the policy server on this machine (the embedded mode, the
    launcher); `training_device`: training.device (cpu training leaves the GPU alone)."""
    mode = policy.sleep_during_training
    if mode != "auto":
        return mode == "on"
    if policy.device != "cuda" or training_device == "cpu":
        return False
    shares = policy.shares_gpu_with_trainer
    return own_server if shares is None else shares


def run_sleeps(config: RunConfig, *, own_server: bool) -> bool:
    """`sleep_during_training` for a run: its policy and training settings."""
    return sleep_during_training(config.policy, training_device=config.training.device, own_server=own_server)


def server_flags(sleep_mode: bool) -> tuple[list[str], dict[str, str]]:
    """The launcher's extra vLLM arguments and environment for sleep mode (none without)."""
    return ([SLEEP_FLAG], {DEV_MODE_ENV: "1"}) if sleep_mode else ([], {})


def release_gpu_memory() -> int:
    """Give the training's cached CUDA memory back to the GPU, before the policy wakes: training in
    this process (the embedded mode, a trainer job's work-horse) leaves its tensors in PyTorch's
    caching allocator, where the woken vLLM could not map its weights and KV cache again. Returns
    the bytes released; 0 where torch was never imported or CUDA never used (torch is not imported
    here: the stage worker stays torch-free)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0
    gc.collect()  # the trainer, its optimizer and model are garbage once the stage returned
    before = int(torch.cuda.memory_reserved())
    torch.cuda.empty_cache()
    return before - int(torch.cuda.memory_reserved())


async def policy_urls(services: ServicesConfig, url: str | None = None) -> list[str]:
    """Every replica of the policy: the pool's (services.policy_pool) or the one server."""
    from selfreward.policy.pool import replica_urls

    if services.policy_pool:
        return await replica_urls(services.policy_pool)
    return [url or services.policy_url]


async def _each(urls: Sequence[str], services: ServicesConfig | None, action: str) -> list[dict[str, object]]:
    from selfreward.policy.pool import replica_client

    async def one(url: str) -> dict[str, object]:
        async with replica_client(url, services) as client:
            if action == "sleep":
                return await client.sleep(SLEEP_LEVEL)
            if action == "wake":
                return await client.wake_up()
            return {"is_sleeping": await client.is_sleeping()}

    results = await asyncio.gather(*(one(u) for u in urls), return_exceptions=True)
    failures = [(u, r) for u, r in zip(urls, results, strict=True) if isinstance(r, BaseException)]
    for _, exc in failures:
        if not isinstance(exc, Exception):
            raise exc
    if failures:
        if len(failures) == 1:
            raise failures[0][1]
        raise ServiceError(
            f"{action} failed on {len(failures)} of {len(urls)} policy replicas:\n"
            + "\n".join(f"- {exc}" for _, exc in failures)
        ) from failures[0][1]
    return [r for r in results if isinstance(r, dict)]


async def sleep_policy(urls: Sequence[str], services: ServicesConfig | None = None) -> None:
    """POST /sleep?level=1 on every replica (concurrently); the first failure raises."""
    await _each(urls, services, "sleep")


async def wake_policy(urls: Sequence[str], services: ServicesConfig | None = None) -> None:
    """POST /wake_up on every replica (a replica that is awake answers "awake" too)."""
    await _each(urls, services, "wake")


async def wake_sleeping(urls: Sequence[str], services: ServicesConfig | None = None) -> list[str]:
    """Wake the replicas that are asleep (a training job killed before its `finally` left them
    so); the URLs woken."""
    states = await _each(urls, services, "is_sleeping")
    asleep = [u for u, s in zip(urls, states, strict=True) if s.get("is_sleeping")]
    if asleep:
        log.warning("policy replicas asleep before a stage that needs them: waking %s", ", ".join(asleep))
        await wake_policy(asleep, services)
    return asleep


@contextlib.contextmanager
def asleep_while(config: RunConfig, url: str | None, *, own_server: bool) -> Iterator[list[str]]:
    """Run the block with the policy asleep when the run says so (else a no-op yielding []):
    every replica sleeps before, and is woken after, whatever the block raised. A wake-up that
    fails after a failed block is logged and the block's error raised; after a block that
    succeeded it raises."""
    if not run_sleeps(config, own_server=own_server):
        yield []
        return
    services = config.services
    urls = asyncio.run(policy_urls(services, url))
    started = time.monotonic()
    asyncio.run(sleep_policy(urls, services))
    log.info("policy asleep for training (%s) in %.1f s", ", ".join(urls), time.monotonic() - started)
    failed = True
    try:
        yield urls
        failed = False
    finally:
        released = release_gpu_memory()
        if released:
            log.info("released %.2f GiB of the training's cached GPU memory", released / 2**30)
        started = time.monotonic()
        try:
            asyncio.run(wake_policy(urls, services))
        except Exception:
            if not failed:
                raise
            log.exception("the policy could not be woken after a failed training (%s)", ", ".join(urls))
        else:
            log.info("policy awake again (%s) in %.1f s", ", ".join(urls), time.monotonic() - started)
