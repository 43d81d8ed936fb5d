"""``ctxpress serve``: the HTTP service, alone, as replicas on Ray Serve, or as a compressing proxy."""

from __future__ import annotations

import argparse
import os

from ..errors import CtxpressError, InputError
from ..guard import API_KEY_ENV, DEFAULT_MAX_QUEUE
from ..models import EMBEDDED_MODELS
from ..prompt.methods import DEFAULT_METHOD
from ..proxy import ANTHROPIC_KEY_ENV, DEFAULT_TIMEOUT, OPENAI_KEY_ENV, Upstream, default_key_env, parse_roles
from ..request import (
    CODE_POLICIES,
    DEFAULT_CODE,
    DEFAULT_JSON,
    DEFAULT_MIN_TOKENS,
    DEFAULT_RATE,
    DEFAULT_ROLES,
    JSON_POLICIES,
    PromptRequest,
)
from ..server.settings import (
    DEFAULT_HOST,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_PORT,
    DEFAULT_REQUEST_TIMEOUT,
)
from .common import non_negative_float, non_negative_int, positive_float, positive_int
from .groups import add_budget, add_method, add_method_options, add_model_options


def register(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("serve", help="run the HTTP service (OpenAI-compatible chat, compression)",
                       description="Serve /v1/compress, /v1/chat/completions, /metrics and /healthz; docs at /docs.")
    v.add_argument("--host", default=DEFAULT_HOST, help=f"default {DEFAULT_HOST} (this machine only)")
    v.add_argument("--port", type=positive_int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    v.add_argument("--max-request-bytes", type=positive_int, default=DEFAULT_MAX_REQUEST_BYTES, metavar="N",
                   help=f"largest request body accepted (default {DEFAULT_MAX_REQUEST_BYTES // 2**20} MiB)")
    v.add_argument("--max-new-tokens", type=positive_int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                   help=f"largest max_tokens a chat request may ask for (default {DEFAULT_MAX_NEW_TOKENS})")
    v.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' or 'x-api-key: KEY' on every path but /healthz (default: "
                        f"${API_KEY_ENV}; prefer the variable, a flag's value is visible to other users)")
    v.add_argument("--max-queue", type=non_negative_int, default=DEFAULT_MAX_QUEUE, metavar="N",
                   help=f"requests that may wait for the model behind the one served; more get 429 with "
                        f"Retry-After (default {DEFAULT_MAX_QUEUE})")
    v.add_argument("--request-timeout", type=non_negative_float, default=DEFAULT_REQUEST_TIMEOUT, metavar="S",
                   help="seconds a request may take from arrival, waiting included, before it is answered 504 "
                        f"(a stream ends with finish_reason length); 0: no limit (default {DEFAULT_REQUEST_TIMEOUT:g})")
    v.add_argument("--replicas", type=positive_int, default=1, metavar="N",
                   help="N model replicas behind the one endpoint, on Ray Serve (default 1: this process alone)")
    v.add_argument("--ray-address", metavar="ADDR",
                   help="with --replicas, the Ray cluster to run them on (default: start a local Ray)")
    v.add_argument("--threads", type=positive_int, metavar="N",
                   help="with --replicas, torch threads (and Ray CPUs) per replica (default: this machine's "
                        "cores / N)")
    _add_proxy_options(v)
    add_model_options(v)
    v.set_defaults(handler=run)


def _add_proxy_options(v: argparse.ArgumentParser) -> None:
    proxy = v.add_argument_group(
        "proxy", "with --upstream, chat, completions and messages are forwarded to that API (OpenAI-compatible "
        "or Anthropic's) after long messages are compressed; a request's prompt_compression field overrides "
        "these per request")
    proxy.add_argument("--upstream", metavar="URL",
                       help="base URL of the upstream API, as the openai client takes it (http://host:8001/v1)")
    proxy.add_argument("--upstream-key-env", metavar="NAME",
                       help=f"environment variable holding the upstream's key, sent as x-api-key on /v1/messages "
                            f"and as Authorization: Bearer on the OpenAI routes (default {ANTHROPIC_KEY_ENV} for "
                            f"api.anthropic.com, else {OPENAI_KEY_ENV}; unset: no key sent)")
    proxy.add_argument("--upstream-timeout", type=positive_float, default=DEFAULT_TIMEOUT, metavar="S",
                       help=f"seconds to wait for the upstream between bytes (default {DEFAULT_TIMEOUT:g}); "
                            "then 504")
    add_budget(proxy, required=False, rate_help=f"fraction of a long message's tokens kept (default {DEFAULT_RATE:g})",
               tokens_help="tokens a compressed message keeps")
    add_method(proxy, f"prompt compression method (default {DEFAULT_METHOD})")
    add_method_options(proxy)
    proxy.add_argument("--compress-roles", type=parse_roles, default=DEFAULT_ROLES, metavar="LIST",
                       help=f"roles whose messages are compressed (default {','.join(DEFAULT_ROLES)})")
    proxy.add_argument("--min-tokens", type=non_negative_int, default=DEFAULT_MIN_TOKENS, metavar="N",
                       help="messages of at most N tokens (a short question) are sent as they are "
                            f"(default {DEFAULT_MIN_TOKENS})")
    proxy.add_argument("--json-policy", choices=JSON_POLICIES, default=DEFAULT_JSON,
                       help="a message that is a JSON object or array: keep it byte-identical, or shorten its long "
                            f"string values (every key kept, it still parses) (default {DEFAULT_JSON})")
    proxy.add_argument("--code-policy", choices=CODE_POLICIES, default=DEFAULT_CODE,
                       help="fenced code blocks and tool results that are source code: keep them byte-identical, "
                            f"or compress them as prose (they may no longer run) (default {DEFAULT_CODE})")


def _forwarding(args: argparse.Namespace) -> dict:
    """``create_app``'s upstream and policy from the proxy options, checked before the model loads."""
    if args.upstream is not None:
        key_env = args.upstream_key_env or default_key_env(args.upstream)
        upstream = Upstream(args.upstream, os.environ.get(key_env) or None, args.upstream_timeout)
        return {"upstream": upstream, "policy": PromptRequest.from_args(args)}
    if args.rate or args.target_tokens or args.options or args.method != DEFAULT_METHOD:
        raise InputError("--rate, --target-tokens, --method and --option configure the proxy: add --upstream URL "
                         "(the local chat endpoint takes prompt_compression per request)")
    return {}


def run(args: argparse.Namespace) -> int:
    from ..memory import map_large_blocks
    from ..models import ensure_converted, load_model

    try:
        from ..server import serve
    except ImportError as exc:
        raise CtxpressError(f"ctxpress serve needs {exc.name}: pip install 'ctxpress[serve]'") from None
    if args.api_key is not None and not args.api_key.strip():
        raise InputError(f"--api-key (or ${API_KEY_ENV}) is empty")
    app_options = dict(max_request_bytes=args.max_request_bytes, max_new_tokens=args.max_new_tokens,
                       api_key=args.api_key, max_queue=args.max_queue, request_timeout=args.request_timeout or None,
                       **_forwarding(args))
    if args.replicas > 1:
        from ..replicas import ReplicaSpec, default_threads, serve_replicas

        if args.model in EMBEDDED_MODELS:
            ensure_converted(args.model)  # once here, not once per replica
        spec = ReplicaSpec(args.model, args.device, args.dtype, args.threads or default_threads(args.replicas),
                           app_options)
        serve_replicas(spec, args.replicas, args.host, args.port, max_queue=args.max_queue,
                       ray_address=args.ray_address)
        return 0
    if args.ray_address or args.threads:
        raise InputError("--ray-address and --threads configure replicas: add --replicas N (N > 1)")
    map_large_blocks()  # a long-lived process: keep large tensors off the heap they would fragment
    serve(load_model(args.model, device=args.device, dtype=args.dtype), args.host, args.port, **app_options)
    return 0


__all__ = ["register", "run"]
