"""The launcher as a client of the stack it started: what it prints, and its ``--smoke`` test.

* :func:`usage_text` — how to reach the running topology: the HTTP base URL, a ``curl`` line and
  a Python NATS snippet with the client's login (user, password file, inbox prefix, TLS CA).
* :func:`api_headers` — the frontend's API key as a request header, for the launcher's own
  readiness polls and smoke requests.
* :func:`run_smoke` — one chat request over HTTP and one over the public NATS subject
  ``{ns}.v1.chat.completions``; both must come back with non-empty content.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

from tandem.protocol.subjects import Subjects
from tandem.services.auth import NatsAuth, inbox_prefix, server_list
from tandem.services.launch_plan import LaunchConfig

__all__ = [
    "MODEL_NAME",
    "SMOKE_PROMPTS",
    "api_headers",
    "chat_content",
    "describe_extension",
    "http_base_url",
    "nats_login",
    "run_smoke",
    "smoke_body",
    "usage_text",
]

# The served model name (``tandem.engine.weights.MODEL_NAME``; not imported to keep the launcher
# free of torch).
MODEL_NAME = "smollm2-135m-instruct"


# ---- user-facing text ----------------------------------------------------------------------------


def http_base_url(cfg: LaunchConfig) -> str:
    """Base URL clients use (a wildcard bind address is reached through loopback)."""
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "", "::") else cfg.host
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{cfg.port}"


def _connect_args(nats_url: str, client: NatsAuth | None) -> str:
    """The arguments of ``nats.connect(...)`` in the usage snippet (the client's login and TLS)."""
    servers = server_list(nats_url)
    args = [repr(servers[0] if len(servers) == 1 else servers)]
    if client is not None and client.nats_user:
        args += [
            f"user={client.nats_user!r}",
            f"password=open({client.nats_password_file!r}).read().strip()",
            f"inbox_prefix={inbox_prefix(client.nats_user)!r}",
        ]
    if client is not None and client.nats_tls_ca:
        args.append(f"tls=ssl.create_default_context(cafile={client.nats_tls_ca!r})")
    return ",\n        ".join(args)


def usage_text(cfg: LaunchConfig, nats_url: str, log_dir: Path, client: NatsAuth | None = None) -> str:
    """What to paste to try the running topology (HTTP curl and a NATS request in Python).

    ``client``: the credential to show for NATS (the embedded server's first client user).
    """
    subjects = Subjects(cfg.namespace)
    base = http_base_url(cfg)
    body = json.dumps(
        {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 32,
        }
    )
    nats_snippet = (
        "import asyncio, json, nats, ssl\n"
        "async def main():\n"
        f"    nc = await nats.connect({_connect_args(nats_url, client)})\n"
        f"    body = {{'model': {MODEL_NAME!r}, 'max_tokens': 32,\n"
        "            'messages': [{'role': 'user', 'content': 'What is the capital of France?'}]}\n"
        f"    msg = await nc.request({subjects.chat_completions!r}, json.dumps(body).encode(), timeout=120)\n"
        "    print(json.loads(msg.data)['choices'][0]['message']['content'])\n"
        "    await nc.close()\n"
        "asyncio.run(main())"
    )
    return "\n".join(
        [
            "",
            f"tandem is ready  (namespace {cfg.namespace!r}, logs in {log_dir})",
            f"  HTTP (OpenAI API): {base}/v1",
            f"  NATS:              {nats_url}   subjects {subjects.chat_completions}, {subjects.completions}",
            *(
                [
                    f"{'':21}user {client.nats_user!r}, password in {client.nats_password_file}, "
                    f"inbox prefix {inbox_prefix(client.nats_user)} (only its own inboxes)"
                ]
                if client is not None and client.nats_user
                else []
            ),
            "",
            "Try it over HTTP:",
            f"  curl -s {base}/v1/chat/completions -H 'Content-Type: application/json' \\",
            f"    -d {shlex.quote(body)}",
            "",
            "Try it over NATS (OpenAI JSON in, JSON out):",
            f"  {shlex.quote(sys.executable)} - <<'EOF'",
            *("  " + line for line in nats_snippet.splitlines()),
            "  EOF",
            "",
            "Ctrl-C stops everything.",
            "",
        ]
    )


def api_headers(cfg: LaunchConfig) -> dict[str, str]:
    """The frontend's API key as a request header (``--api-key`` / ``$TANDEM_API_KEY``), for the
    launcher's own readiness polls and smoke requests; empty without a key."""
    key = cfg.frontend.resolved_api_key()
    return {"Authorization": f"Bearer {key}"} if key else {}


def nats_login(auth: NatsAuth | None) -> dict[str, Any]:
    """``nats.connect`` keyword arguments for ``auth``'s login and TLS ({} without one)."""
    return auth.connect_options() if auth is not None else {}


# ---- smoke ---------------------------------------------------------------------------------------

SMOKE_PROMPTS = (
    "France is a country in Western Europe. It borders Belgium, Luxembourg, Germany, Switzerland, "
    "Italy, Monaco, Spain and Andorra, and has coasts on the Atlantic Ocean, the English Channel "
    "and the Mediterranean Sea. Its largest city is also its political and cultural centre. "
    "What is the capital of France? Answer in one sentence.",
    "The Eiffel Tower, the Louvre museum and the cathedral of Notre-Dame are among the most "
    "visited places in the world. Millions of tourists come to see them every year, and many "
    "also walk along the river Seine, which flows through the middle of the city. "
    "What is the capital of France? Answer in one sentence.",
)


def smoke_body(prompt: str) -> dict[str, Any]:
    """The OpenAI chat body the smoke test sends (greedy, short)."""
    return {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 32,
        "temperature": 0,
    }


def chat_content(reply: dict[str, Any]) -> str:
    """``choices[0].message.content`` of an OpenAI chat reply ('' when missing)."""
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return ""
    return content if isinstance(content, str) else ""


def describe_extension(ext: Any) -> str:
    """One line from the ``tandem`` reply extension: where it ran and the KV moved."""
    if not isinstance(ext, dict):
        return "no tandem extension in the reply"
    kv = ext.get("kv_transfer") or {}
    parts = [
        f"prefill worker {ext.get('prefill_worker') or '-'}",
        f"decode worker {ext.get('decode_worker') or '-'}",
        f"cached tokens {ext.get('cached_tokens', 0)}",
    ]
    if ext.get("ttft_ms") is not None:
        parts.append(f"TTFT {float(ext['ttft_ms']):.1f} ms")
    if isinstance(kv, dict) and kv:
        ms = float(kv.get("ms") or 0)
        nbytes = int(kv.get("bytes") or 0)
        rate = f", {nbytes / ms / 1e6:.2f} GB/s" if ms > 0 else ""
        parts.append(
            f"KV moved {nbytes} B in {int(kv.get('blocks') or 0)} blocks "
            f"({int(kv.get('reused_blocks') or 0)} reused) in {ms:.2f} ms{rate}"
        )
    else:
        parts.append("KV moved 0 B (prefilled where it decoded)")
    return ", ".join(parts)


async def run_smoke(cfg: LaunchConfig, nats_url: str, client: NatsAuth | None = None) -> bool:
    """One chat request over HTTP, one over NATS (as ``client``); True iff both answered with content."""
    import aiohttp
    import nats

    ok = True
    url = f"{http_base_url(cfg)}/v1/chat/completions"
    headers = api_headers(cfg)
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session,
            session.post(url, json=smoke_body(SMOKE_PROMPTS[0]), headers=headers) as resp,
        ):
            text = await resp.text()
            reply = json.loads(text) if resp.status == 200 else {}
            if resp.status != 200:
                print(f"smoke HTTP: status {resp.status}: {text[:500]}")
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as e:
        print(f"smoke HTTP: failed: {type(e).__name__}: {e}")
        reply = {}
    content = chat_content(reply)
    ext = reply.get("tandem")
    print(f"smoke HTTP  POST {url}\n  answer: {content!r}\n  tandem: {describe_extension(ext)}")
    ok &= bool(content.strip())

    subject = Subjects(cfg.namespace).chat_completions
    reply = {}
    try:
        nc = await nats.connect(server_list(nats_url), name="tandem-launcher-smoke", **nats_login(client))
        try:
            body = json.dumps(smoke_body(SMOKE_PROMPTS[1])).encode()
            msg = await nc.request(subject, body, timeout=300, headers=headers or None)
            reply = json.loads(msg.data)
        finally:
            await nc.close()
    except Exception as e:  # nats raises several unrelated types; report any
        print(f"smoke NATS: failed: {type(e).__name__}: {e}")
    if isinstance(reply, dict) and "error" in reply:
        print(f"smoke NATS: error reply: {json.dumps(reply)[:500]}")
    content = chat_content(reply) if isinstance(reply, dict) else ""
    ext = reply.get("tandem") if isinstance(reply, dict) else None
    print(f"smoke NATS  request {subject}\n  answer: {content!r}\n  tandem: {describe_extension(ext)}")
    ok &= bool(content.strip())
    print("smoke: OK" if ok else "smoke: FAILED")
    return ok
