"""A stand-in for one vLLM replica: the endpoints publishing uses, on a real loopback HTTP port.

It speaks vLLM's wire format for what `selfreward.policy.publish` and `selfreward.policy.pool` ask
(`GET /v1/models`, `POST /v1/load_lora_adapter`, `POST /v1/unload_lora_adapter`,
`POST /v1/completions` with token-id prompts, `logprobs` and `return_tokens_as_token_ids`,
`GET /health`), so the per-replica logic of a pool is tested over HTTP without starting several
vLLM servers. Its answers come from the adapters' own fingerprints (manifest.json):

- an adapter answers each fingerprinted prefix with its recorded top logprobs, plus `wrong_by`
  (a replica serving other weights than trained);
- the base model answers the same prefixes `BASE_SHIFT` lower (a parent the check tells apart);
- with `sleep_mode` (a server started with `--enable-sleep-mode` and VLLM_SERVER_DEV_MODE=1) it
  answers `POST /sleep?level=N` ({"status": "sleeping", "level": N}), `POST /wake_up`
  ({"status": "awake", "tags": null}) and `GET /is_sleeping` ({"is_sleeping": bool}) as vLLM
  0.32's `vllm/entrypoints/serve/dev/sleep/api_router.py` does, and without it 404 on all three
  (FastAPI's {"detail": "Not Found"}, a route that does not exist); while asleep a completion
  request is accepted and waits until /wake_up, as vLLM's paused scheduler queues new requests
  (`calls` records every sleep-mode call in order, `queued_while_asleep` the requests that waited);
- `POST /v1/chat/completions` answers `<model>: <last user message>` after `chat_delay_s`
  (an answer takes time, as decoding does) and counts requests in flight, overall and per model
  (`peak_in_flight`, `peak_models_in_flight`: how many models had requests in flight at once);
- with `resolver_dir`, an unknown model name is loaded on first request from `<resolver_dir>/<name>/`
  when its adapter_config.json is a LoRA on `base_root`: the rule of vLLM 0.32's filesystem LoRA
  resolver (`vllm/plugins/lora_resolvers/filesystem_resolver.py`).

`fake_vllm(...)` runs one in a thread; `host` may be any loopback address (127.0.0.2, ...), so a
pool of replicas can share one port as the pods behind a headless Service do.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from selfreward.testing.servers import free_port, wait_port

BASE_SHIFT = 1.0


@dataclass
class FakeVLLM:
    base_name: str = "m0"
    base_root: str = "/models/base"
    resolver_dir: Path | None = None
    wrong_by: float = 0.0
    host: str = "127.0.0.1"
    port: int = 0
    adapters: dict[str, str] = field(default_factory=dict)  # served name -> path it was loaded from
    loads: list[str] = field(default_factory=list)  # names loaded through /v1/load_lora_adapter
    resolved: list[str] = field(default_factory=list)  # names loaded by the resolver
    tables: dict[str, dict[tuple[int, ...], list[list[float]]]] = field(default_factory=dict)
    sleep_mode: bool = False
    sleeping: int = 0  # the level it sleeps at; 0: awake
    calls: list[str] = field(default_factory=list)  # "sleep?level=1", "wake_up", "is_sleeping"
    queued_while_asleep: int = 0
    chat_delay_s: float = 0.05
    chats: list[str] = field(default_factory=list)  # the model of every chat request, in arrival order
    in_flight: dict[str, int] = field(default_factory=dict)  # model -> chat requests in flight
    peak_in_flight: int = 0
    peak_models_in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _read(self, path: Path) -> dict[tuple[int, ...], list[list[float]]]:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        table = {}
        for probe in manifest["fingerprint"]["probes"]:
            for row in probe["positions"]:
                table[tuple(probe["input_ids"][: row["pos"]])] = row["top"]
        return table

    def _load(self, name: str, path: Path) -> None:
        self.tables[name] = self._read(path)
        self.adapters[name] = str(path)

    def _resolve(self, name: str) -> bool:
        if self.resolver_dir is None:
            return False
        folder = self.resolver_dir / name
        config_path = folder / "adapter_config.json"
        if not config_path.is_file():
            return False
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.get("peft_type") != "LORA" or config.get("base_model_name_or_path") != self.base_root:
            return False
        self._load(name, folder)
        self.resolved.append(name)
        return True

    def answer(self, model: str, prefix: tuple[int, ...]) -> list[list[float]]:
        if model == self.base_name:
            for table in self.tables.values():
                if prefix in table:
                    return [[t, v - BASE_SHIFT] for t, v in table[prefix]]
            return [[0, -0.5], [1, -1.5]]
        return [[t, v + self.wrong_by] for t, v in self.tables[model].get(prefix, [[0, -0.5]])]


def _error(status: int, message: str) -> JSONResponse:
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _build_app(fake: FakeVLLM) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> PlainTextResponse:
        return PlainTextResponse("")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        with fake._lock:
            data = [{"id": fake.base_name, "object": "model", "root": fake.base_root, "parent": None}]
            data += [
                {"id": n, "object": "model", "root": p, "parent": fake.base_name}
                for n, p in fake.adapters.items()
            ]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter", response_model=None)
    async def load(request: Request) -> Any:
        body = await request.json()
        name, path = str(body["lora_name"]), Path(str(body["lora_path"]))
        with fake._lock:
            if name in fake.adapters:
                return _error(
                    400,
                    f"The lora adapter '{name}' has already been loaded. If you want to load the adapter "
                    "in place, set 'load_inplace' to True.",
                )
            if not (path / "adapter_config.json").is_file():
                return _error(404, f"Loading lora {name} failed: No adapter found for {path}")
            fake._load(name, path)
            fake.loads.append(name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", response_model=None)
    async def unload(request: Request) -> Any:
        name = str((await request.json())["lora_name"])
        with fake._lock:
            if name not in fake.adapters:
                return _error(404, f"The lora adapter '{name}' cannot be found.")
            del fake.adapters[name]
            fake.tables.pop(name, None)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    if fake.sleep_mode:

        @app.post("/sleep")
        async def sleep(level: Annotated[int, Query(ge=0, le=2)] = 1) -> dict[str, Any]:
            with fake._lock:
                fake.calls.append(f"sleep?level={level}")
                fake.sleeping = max(fake.sleeping, level) or -1  # level 0 pauses scheduling only
            return {"status": "sleeping", "level": level}

        @app.post("/wake_up")
        async def wake_up(request: Request) -> dict[str, Any]:
            tags = request.query_params.getlist("tags") or None
            with fake._lock:
                fake.calls.append("wake_up")
                fake.sleeping = 0
            return {"status": "awake", "tags": tags}

        @app.get("/is_sleeping")
        async def is_sleeping() -> dict[str, Any]:
            with fake._lock:
                fake.calls.append("is_sleeping")
                return {"is_sleeping": fake.sleeping != 0}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Any:
        body = await request.json()
        model = str(body["model"])
        with fake._lock:
            if model != fake.base_name and model not in fake.adapters and not fake._resolve(model):
                return _error(404, f"The model `{model}` does not exist. Valid aliases: {fake.base_name}.")
            fake.chats.append(model)
            fake.in_flight[model] = fake.in_flight.get(model, 0) + 1
            fake.peak_in_flight = max(fake.peak_in_flight, sum(fake.in_flight.values()))
            fake.peak_models_in_flight = max(
                fake.peak_models_in_flight, sum(1 for n in fake.in_flight.values() if n)
            )
        try:
            await asyncio.sleep(fake.chat_delay_s)
        finally:
            with fake._lock:
                fake.in_flight[model] -= 1
        text = f"{model}: {body['messages'][-1]['content']}"
        choices = [
            {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            for i in range(int(body.get("n", 1)))
        ]
        usage = {"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12}
        return {"object": "chat.completion", "model": model, "choices": choices, "usage": usage}

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Any:
        body = await request.json()
        if fake.sleeping:  # vLLM accepts it and schedules it once awake
            with fake._lock:
                fake.queued_while_asleep += 1
            while fake.sleeping:
                await asyncio.sleep(0.02)
        model = str(body["model"])
        with fake._lock:
            if model != fake.base_name and model not in fake.adapters and not fake._resolve(model):
                return _error(404, f"The model `{model}` does not exist. Valid aliases: {fake.base_name}.")
            prompts = body["prompt"]
            if prompts and isinstance(prompts[0], int):
                prompts = [prompts]
            choices = []
            for i, ids in enumerate(prompts):
                top = fake.answer(model, tuple(int(t) for t in ids))
                dist = {f"token_id:{int(t)}": float(v) for t, v in top}
                first = f"token_id:{int(top[0][0])}"
                choices.append(
                    {
                        "index": i,
                        "text": "",
                        "logprobs": {"tokens": [first], "top_logprobs": [dist]},
                        "finish_reason": "length",
                    }
                )
        return {"object": "text_completion", "model": model, "choices": choices, "usage": {}}

    return app


@contextmanager
def fake_vllm(
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    base_name: str = "m0",
    base_root: str = "/models/base",
    resolver_dir: Path | None = None,
    wrong_by: float = 0.0,
    sleep_mode: bool = False,
) -> Iterator[FakeVLLM]:
    """Run one fake replica on `host:port` (default a free port) in a thread; yield it."""
    import uvicorn

    fake = FakeVLLM(
        base_name=base_name,
        base_root=base_root,
        resolver_dir=resolver_dir,
        wrong_by=wrong_by,
        host=host,
        sleep_mode=sleep_mode,
    )
    fake.port = port or free_port()
    server = uvicorn.Server(
        uvicorn.Config(_build_app(fake), host=host, port=fake.port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, name=f"fake-vllm-{host}:{fake.port}", daemon=True)
    thread.start()
    try:
        wait_port(fake.port, timeout_s=15, host=host)
        yield fake
    finally:
        server.should_exit = True
        thread.join(timeout=10)
