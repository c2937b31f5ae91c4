"""`kore-gateway demo`: the sandbox and the gateway together on loopback, for a first look."""

from __future__ import annotations

import json
import shlex
import sys

from aiohttp import web

from gateway.config.model import Config, with_changes
from gateway.http.server import run_worker
from gateway.sandbox.server import KoreSandbox, SandboxApp


def curl_line(config: Config, key: str, bot_id: str) -> str:
    url = f"http://{config.server.listen}/v1/bots/{bot_id}/sessions/deactivate"
    body = json.dumps({"userId": "u-1001", "channel": "rtm"})
    return (f"curl -i -X POST {url} -H {shlex.quote('Authorization: Bearer ' + key)} "
            f"-H 'Content-Type: application/json' -d {shlex.quote(body)}")


async def run_demo(config: Config, sandbox_port: int, key: str, bot_id: str) -> int:
    sandbox = KoreSandbox([SandboxApp.from_kore_app(a) for a in config.apps])
    runner = web.AppRunner(sandbox.create_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", sandbox_port).start()
    upstream = with_changes(config.upstream, base_url=f"http://127.0.0.1:{sandbox_port}",
                            allow_insecure_http=True)
    config = with_changes(config, upstream=upstream)

    def announce() -> None:
        print(f"\nkore-session-gateway demo\n"
              f"  gateway  http://{config.server.listen}\n"
              f"  sandbox  http://127.0.0.1:{sandbox_port}  (a local Kore.ai emulator)\n"
              f"  audit    {config.audit.path}\n\n"
              f"Close a session (in another terminal):\n\n  {curl_line(config, key, bot_id)}\n\n"
              f"Then check the audit chain:\n\n  {sys.executable} -m gateway audit verify {config.audit.path}\n\n"
              f"Ctrl-C stops the demo.\n", flush=True)

    try:
        return await run_worker(config, on_ready=announce)
    finally:
        await runner.cleanup()
