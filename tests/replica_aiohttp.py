"""A deployed model served by aiohttp, a third-party HTTP server, for tests/e2e/predict.rs.

Listens on 127.0.0.1, port 0, and prints "PORT <n>" once it is serving.

  GET  /health                      200
  POST /v1/models/model:predict     {"n": k}: k lines "part i", streamed chunk by chunk;
                                    the answer names what arrived in x-seen-* fields
  any  /v1/models                   {"method", "query"}, status from ?status=
"""

import asyncio
import json
import socket
import sys

from aiohttp import web


async def health(_request):
    return web.Response(text="ok")


async def predict(request):
    body = await request.read()
    n = json.loads(body).get("n", 1)
    response = web.StreamResponse(
        headers={
            "content-type": "text/plain",
            "x-seen-authorization": request.headers.get("authorization", "-"),
            "x-seen-forwarded-for": request.headers.get("x-forwarded-for", "-"),
            "x-seen-length": str(len(body)),
        }
    )
    response.enable_chunked_encoding()
    await response.prepare(request)
    for i in range(n):
        await response.write(f"part {i}\n".encode())
        await asyncio.sleep(0.01)
    await response.write_eof()
    return response


async def models(request):
    status = int(request.query.get("status", "200"))
    return web.json_response(
        {"method": request.method, "query": request.query_string}, status=status
    )


async def main():
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/models/model:predict", predict)
    app.router.add_route("*", "/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    # Until the test ends: it kills the process, or closes stdin.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
