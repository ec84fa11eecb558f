"""Which ASGI framework serves hpcbatch: FastAPI + pydantic v2 or Litestar + msgspec.

Each framework serves the same two routes from its own uvicorn process (one worker, the
server `hpcbatch serve` would be), driven from this process with httpx:

  (a) a small authenticated GET of a JSON object (Bearer key checked in constant time):
      requests/s with CONCURRENCY requests in flight, over DURATION_S seconds;
  (b) POST of one body of TASKS task dicts (addtaskcollection): seconds to decode and
      validate, and the server's peak RSS above its idle RSS (VmHWM - VmRSS at start;
      a fresh server for each). Three ways: the framework's typed body (a list of
      pydantic models / of msgspec Structs: every task an object), and the bounded way
      `hpcbatch serve` takes (the raw body decoded by msgspec to plain dicts, each
      validated in chunks of 1,000 by a typed decoder, never all at once), and "lazy":
      the body decoded with each task kept as its raw JSON slice (msgspec.Raw), each
      chunk of 1,000 decoded and validated only when it is reached.

    python benchmarks/bench_frameworks.py [--tasks 100000 --duration 5]

Writes bench-results/bench_frameworks.json (HPCBATCH_BENCH_DIR) beside the table.
"""

# no "from __future__ import annotations": FastAPI and Litestar read these annotations at run time

import argparse
import asyncio
import hmac
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

KEY = "hpcb_bench_" + "s" * 32
KEY_HASH = __import__("hashlib").sha256(KEY.encode()).hexdigest()
CHUNK = 1000
POOL = {"id": "p1", "provider": "local", "task_slots_per_node": 4, "scheduling_policy": "pack",
        "target_nodes": 1, "start_task": None, "inter_node_communication": False,
        "provider_config": {}, "node_states": {"idle": 1}, "where": "1 local node(s)",
        "notes": [], "node_python": sys.executable}


def _authorized(header: str | None) -> bool:
    import hashlib
    if not header or not header.startswith("Bearer "):
        return False
    digest = hashlib.sha256(header[7:].encode()).hexdigest()
    return hmac.compare_digest(digest, KEY_HASH)


# ---------------------------------------------------------------- the two apps

def _lazy_collection():
    import msgspec

    class LazyCollection(msgspec.Struct):
        """The body with each task left as its JSON text (a slice of the body)."""
        tasks: list[msgspec.Raw]
        atomic: bool = False
    return LazyCollection


LazyCollection = _lazy_collection()

def fastapi_app():
    import msgspec
    from fastapi import Depends, FastAPI, HTTPException, Request
    from pydantic import BaseModel, Field

    class TaskIn(BaseModel):
        id: str = Field(min_length=1, max_length=64)
        command_line: str = Field(min_length=1)
        environment: dict[str, str] = {}
        required_slots: int = Field(1, ge=1, le=1024)
        max_task_retry_count: int | None = None
        max_wall_clock_time_s: float | None = None

    class Collection(BaseModel):
        tasks: list[TaskIn]
        atomic: bool = False

    def auth(request: Request) -> None:
        if not _authorized(request.headers.get("authorization")):
            raise HTTPException(401, "no valid key")

    app = FastAPI()
    chunk_type = list[TaskIn]
    from pydantic import TypeAdapter
    chunk_adapter = TypeAdapter(chunk_type)

    @app.get("/v1/pools/{pool_id}", dependencies=[Depends(auth)])
    def get_pool(pool_id: str) -> dict:
        return {**POOL, "id": pool_id}

    @app.post("/typed/addtaskcollection", dependencies=[Depends(auth)])
    def typed(body: Collection) -> dict:
        return {"added": len(body.tasks), "errors": []}

    @app.post("/raw/addtaskcollection", dependencies=[Depends(auth)])
    async def raw(request: Request) -> dict:
        data = msgspec.json.decode(await request.body())
        tasks = data["tasks"]
        n = 0
        for i in range(0, len(tasks), CHUNK):
            n += len(chunk_adapter.validate_python(tasks[i:i + CHUNK]))
        return {"added": n, "errors": []}

    lazy_decoder = msgspec.json.Decoder(LazyCollection)

    @app.post("/lazy/addtaskcollection", dependencies=[Depends(auth)])
    async def lazy(request: Request) -> dict:
        data = lazy_decoder.decode(await request.body())
        n = 0
        for i in range(0, len(data.tasks), CHUNK):
            chunk = [msgspec.json.decode(t) for t in data.tasks[i:i + CHUNK]]
            n += len(chunk_adapter.validate_python(chunk))
        return {"added": n, "errors": []}

    return app


def litestar_app():
    import msgspec
    from litestar import Litestar, Request, get, post
    from litestar.connection import ASGIConnection
    from litestar.exceptions import NotAuthorizedException
    from litestar.handlers import BaseRouteHandler

    class TaskIn(msgspec.Struct, forbid_unknown_fields=True):
        id: str
        command_line: str
        environment: dict[str, str] = {}
        required_slots: int = 1
        max_task_retry_count: int | None = None
        max_wall_clock_time_s: float | None = None

    class Collection(msgspec.Struct):
        tasks: list[TaskIn]
        atomic: bool = False

    def guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        if not _authorized(connection.headers.get("authorization")):
            raise NotAuthorizedException("no valid key")

    @get("/v1/pools/{pool_id:str}", guards=[guard], sync_to_thread=True)
    def get_pool(pool_id: str) -> dict:
        return {**POOL, "id": pool_id}

    @post("/typed/addtaskcollection", guards=[guard], sync_to_thread=True, status_code=200)
    def typed(data: Collection) -> dict:
        return {"added": len(data.tasks), "errors": []}

    @post("/raw/addtaskcollection", guards=[guard], status_code=200)
    async def raw(request: Request) -> dict:
        data = msgspec.json.decode(await request.body())
        tasks = data["tasks"]
        n = 0
        for i in range(0, len(tasks), CHUNK):
            n += len(msgspec.convert(tasks[i:i + CHUNK], list[TaskIn]))
        return {"added": n, "errors": []}

    lazy_decoder = msgspec.json.Decoder(LazyCollection)

    @post("/lazy/addtaskcollection", guards=[guard], status_code=200)
    async def lazy(request: Request) -> dict:
        data = lazy_decoder.decode(await request.body())
        n = 0
        for i in range(0, len(data.tasks), CHUNK):
            chunk = [msgspec.json.decode(t) for t in data.tasks[i:i + CHUNK]]
            n += len(msgspec.convert(chunk, list[TaskIn]))
        return {"added": n, "errors": []}

    return Litestar([get_pool, typed, raw, lazy], request_max_body_size=512 * 1024 * 1024)


def serve(framework: str, port: int) -> None:
    import uvicorn
    app = fastapi_app() if framework == "fastapi" else litestar_app()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# ---------------------------------------------------------------- the driver

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


class Server:
    def __init__(self, framework: str):
        import httpx
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", framework,
                                      "--port", str(self.port)])
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(self.url + "/v1/pools/x", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError(f"{framework} server did not start") from None
                time.sleep(0.05)
        self.idle_kib = rss_kib(self.proc.pid, "VmRSS")

    def peak_above_idle_mib(self) -> float:
        return (rss_kib(self.proc.pid, "VmHWM") - self.idle_kib) / 1024

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def _get_rps(url: str, duration_s: float, concurrency: int) -> float:
    import httpx
    headers = {"Authorization": f"Bearer {KEY}"}
    done = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits) as client:
        stop = time.perf_counter() + duration_s

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                r = await client.get("/v1/pools/p1")
                assert r.status_code == 200, r.text
                done += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - t0)


def body(tasks: int) -> bytes:
    return json.dumps({"tasks": [{"id": f"t{i}", "command_line": f"echo {i}",
                                  "environment": {"I": str(i)}} for i in range(tasks)],
                       "atomic": False}).encode()


def post_once(framework: str, route: str, data: bytes, tasks: int) -> dict:
    import httpx
    server = Server(framework)
    try:
        t0 = time.perf_counter()
        r = httpx.post(server.url + f"/{route}/addtaskcollection", content=data, timeout=600,
                       headers={"Authorization": f"Bearer {KEY}",
                                "Content-Type": "application/json"})
        seconds = time.perf_counter() - t0
        assert r.status_code == 200 and r.json()["added"] == tasks, r.text[:300]
        return {"seconds": seconds, "peak_rss_mib": server.peak_above_idle_mib(),
                "idle_rss_mib": server.idle_kib / 1024}
    finally:
        server.close()


def suite(ctx) -> list[dict]:
    """hpcbatch bench: GET requests/s and the raw chunked POST of the same tasks, FastAPI
    (what hpcbatch serve uses) against Litestar; both need their packages."""
    tasks = 5_000 if ctx.quick else 100_000
    duration = 1.0 if ctx.quick else 3.0
    missing = []
    for mod, pkg in (("fastapi", "fastapi"), ("litestar", "litestar"), ("uvicorn", "uvicorn")):
        try:
            __import__(mod)
        except ImportError:
            missing.append(pkg)
    why = f"{', '.join(missing)} not installed (pip install {' '.join(missing)})" \
        if missing else None
    v: dict[str, list[float]] = {}
    if not why:
        data = body(tasks)
        for r in range(ctx.repeats):
            for fw in ("litestar", "fastapi"):
                ctx.progress(f"{fw}, repeat {r + 1}/{ctx.repeats}")
                server = Server(fw)
                try:
                    asyncio.run(_get_rps(server.url, 0.3, 16))
                    v.setdefault(f"{fw}_get", []).append(
                        asyncio.run(_get_rps(server.url, duration, 16)))
                finally:
                    server.close()
                v.setdefault(f"{fw}_post", []).append(
                    tasks / post_once(fw, "raw", data, tasks)["seconds"])
    figs = []
    for kind, unit, label in (("get", "req/s", "small authenticated GET, 16 in flight"),
                              ("post", "tasks/s", f"POST of {tasks:,} tasks, raw chunked")):
        base = f"frameworks.litestar.{kind}"
        figs += [{"name": base, "unit": unit, "values": v.get(f"litestar_{kind}", []),
                  "higher_is_better": True, "baseline": None, "ratios": None, "aim": None,
                  "skipped": why, "notes": f"Litestar + msgspec: {label}"},
                 {"name": f"frameworks.fastapi.{kind}", "unit": unit,
                  "values": v.get(f"fastapi_{kind}", []), "higher_is_better": True,
                  "baseline": base, "ratios": None, "aim": None, "skipped": why,
                  "notes": f"FastAPI (hpcbatch serve's framework): {label}"}]
    return figs


def main() -> None:
    from _common import print_table, write_results
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--serve", choices=("fastapi", "litestar"))
    p.add_argument("--port", type=int)
    p.add_argument("--tasks", type=int, default=100_000)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--out")
    a = p.parse_args()
    if a.serve:
        serve(a.serve, a.port)
        return
    data = body(a.tasks)
    results: dict[str, dict] = {}
    for fw in ("fastapi", "litestar"):
        server = Server(fw)
        try:
            asyncio.run(_get_rps(server.url, 1.0, a.concurrency))  # warm up
            rps = asyncio.run(_get_rps(server.url, a.duration, a.concurrency))
        finally:
            server.close()
        results[fw] = {"get_rps": rps, "typed": post_once(fw, "typed", data, a.tasks),
                       "raw_chunked": post_once(fw, "raw", data, a.tasks),
                       "lazy_chunked": post_once(fw, "lazy", data, a.tasks)}
    rows = []
    for fw, r in results.items():
        rows.append([fw, round(r["get_rps"]), r["typed"]["seconds"], r["typed"]["peak_rss_mib"],
                     r["raw_chunked"]["seconds"], r["raw_chunked"]["peak_rss_mib"],
                     r["lazy_chunked"]["seconds"], r["lazy_chunked"]["peak_rss_mib"]])
    print_table(f"ASGI frameworks under uvicorn ({a.tasks:,} tasks, body "
                f"{len(data) / 2**20:.1f} MiB, {os.cpu_count()} cores)",
                ["framework", "GET req/s", "typed POST s", "typed peak MiB",
                 "dicts POST s", "dicts peak MiB", "lazy POST s", "lazy peak MiB"], rows)
    path = write_results("bench_frameworks", {"tasks": a.tasks, "body_bytes": len(data),
                                              "concurrency": a.concurrency,
                                              "duration_s": a.duration, "results": results},
                         a.out)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
