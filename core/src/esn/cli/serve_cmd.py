"""``esn serve`` and ``esn human serve``: HTTP services (the ``serve`` extra: fastapi, uvicorn, imported
only inside the commands, like torch, so that ``esn --help`` stays fast)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.text import Text

from esn.cli.argtypes import command_line, positive_int
from esn.cli.model_cmd import _model_args, check_model_args, load_adapter
from esn.cli.ui import note
from esn.errors import EsnError

TOKEN_ENV = "ESN_SERVE_TOKEN"


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``esn serve`` (``esn human serve`` is added with the other ``human`` commands)."""
    p = sub.add_parser("serve", help="serve steered emotion conversion over HTTP (batched; docs/service.md)",
                       description="An HTTP service: POST /v1/convert, GET /v1/masks, /healthz, /metrics. "
                                   "Concurrent requests run as one batched generate, one steering condition per row.")
    _model_args(p)
    p.add_argument("--masks", type=Path, help="mask file, e.g. <run_dir>/select/masks_cas_r0.005_c50.safetensors")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    g = p.add_argument_group("generation (the same for every request)")
    g.add_argument("--seed", type=int, default=0, help="seed of the speech decoder's noise (default 0)")
    g.add_argument("--speaker", default=None, help="output voice (adapter default if omitted)")
    g.add_argument("--system-prompt", default=None, help="a preset name of the adapter or literal text")
    g.add_argument("--max-new-tokens", type=int, default=256, help="cap on text tokens")
    g.add_argument("--max-audio-tokens", type=int, default=1024, help="cap on speech tokens")
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="adapter option (GenerationConfig.options), repeatable, e.g. token2wav_batch=16")
    lim = p.add_argument_group("batching and limits")
    lim.add_argument("--max-batch", type=int, default=16, help="rows per batched generate (default 16)")
    lim.add_argument("--max-wait-ms", type=float, default=50.0,
                     help="how long a request waits for others to share its batch (default 50 ms)")
    lim.add_argument("--queue-size", type=int, default=64, help="requests waiting for a batch; more get 429 (default 64)")
    lim.add_argument("--timeout", type=float, default=300.0, help="per-request limit in seconds (default 300)")
    lim.add_argument("--max-upload-mb", type=float, default=20.0, help="request body limit in MiB (default 20)")
    lim.add_argument("--max-seconds", type=float, default=30.0, help="input speech limit in seconds (default 30)")
    lim.add_argument("--max-alpha", type=float, default=10.0, help="largest |alpha| accepted (default 10)")
    p.add_argument("--token-file", type=Path,
                   help=f"require 'Authorization: Bearer <token>' with the token in this file (or set {TOKEN_ENV})")
    add_access_args(p, secret="a token")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=cmd_serve)


def add_access_args(p: argparse.ArgumentParser, *, secret: str) -> None:
    """``--allowed-host``, ``--allow-origin``, ``--insecure-no-token``: who may talk to a service
    (esn.serve.guard; docs/service.md says what is refused and why)."""
    g = p.add_argument_group("access (docs/service.md: what is refused and why)")
    g.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host name clients may use besides the bound address and localhost (repeatable), "
                        "e.g. the machine's name or LAN address when --host is 0.0.0.0")
    g.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web origin whose pages may POST/PUT here (repeatable), e.g. http://localhost:3000; "
                        "other cross-origin writes are refused")
    g.add_argument("--insecure-no-token", action="store_true",
                   help=f"serve a --host other than loopback without {secret} (anyone who can reach it may use it)")


def access_for(args: argparse.Namespace, *, token: str | None, secured: bool, fix: str):
    """The service's :class:`~esn.serve.guard.Access` from the access flags; EsnError for a --host other
    than loopback with no secret (``secured``) unless --insecure-no-token."""
    from esn.serve.guard import Access
    from esn.serve.server import is_loopback

    if not is_loopback(args.host) and not secured:
        if not args.insecure_no_token:
            raise EsnError(f"--host {args.host} serves other machines: {fix}, or pass --insecure-no-token to serve "
                           "without one (anyone who can reach this address could use it)")
        note(Text.assemble(("warning:", "yellow"), f" serving on {args.host} without a secret (--insecure-no-token): "
                           "anyone who can reach this address can use it"))
    try:
        access = Access.for_address(args.host, allowed_hosts=args.allowed_host, allow_origins=args.allow_origin,
                                    token=token)
    except ValueError as exc:
        raise EsnError(str(exc)) from None
    if args.host in ("0.0.0.0", "::") and not args.allowed_host:
        note(f"answering only Host {', '.join(sorted(access.hosts))}: add the name or address clients use "
             "with --allowed-host (e.g. --allowed-host 192.168.1.20)")
    return access


def _options(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise EsnError(f"--option {pair!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _token(path: Path | None) -> str | None:
    if path is not None:
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise EsnError(f"--token-file {path}: cannot read ({exc.strerror or exc})") from None
        if not token:
            raise EsnError(f"--token-file {path} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def cmd_serve(args: argparse.Namespace) -> int:
    """``esn serve``: load the model once, then answer conversion requests until SIGINT / SIGTERM."""
    from esn.adapters import GenerationConfig
    from esn.serve import require_extra

    require_extra("esn serve")
    from esn.serve.convert import Converter, Limits
    from esn.serve.server import check_port

    # Everything a user can get wrong is checked before the (slow) model load.
    with command_line():
        check_port(args.port)
    cls = check_model_args(args)
    with command_line():
        limits = Limits(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue_size=args.queue_size,
                        timeout_s=args.timeout, max_upload_mb=args.max_upload_mb, max_seconds=args.max_seconds,
                        max_alpha=args.max_alpha)
        try:
            config = GenerationConfig(seed=args.seed, speaker=args.speaker, system_prompt=args.system_prompt,
                                      max_new_tokens=args.max_new_tokens, max_audio_tokens=args.max_audio_tokens,
                                      options=_options(args.option))
        except ValueError as exc:
            raise EsnError(f"bad generation setting: {exc}") from None
    token = _token(args.token_file)
    masks = None
    if args.masks is not None:
        from esn.artifacts import load_masks

        masks = load_masks(args.masks)
    access = access_for(args, token=token, secured=token is not None,
                        fix=f"give a bearer token (--token-file FILE or {TOKEN_ENV})")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    adapter = load_adapter(args, cls)
    converter = Converter(adapter, config, limits, masks)  # checks the masks against the model
    from esn.serve.app import create_app
    from esn.serve.server import serve

    if converter.max_batch < limits.max_batch:
        note(f"{adapter.name} generates one request at a time: batches of 1")
    serve(create_app(converter, access=access), args.host, args.port, name="esn serve",
          graceful_s=limits.timeout_s + 10, log_level=args.log_level)
    return 0


def cmd_human_serve(args: argparse.Namespace) -> int:
    """``esn human serve``: a kit's listening page and clips; each rater's answers saved on the server."""
    from esn.serve import require_extra

    require_extra("esn human serve")
    from esn.pipeline.listening import RESPONSES, read_kit
    from esn.serve.listening import create_listening_app
    from esn.serve.server import check_port, serve

    with command_line():
        check_port(args.port)

    path = args.path
    if not path.is_dir():
        raise EsnError(f"{path}: not a folder; give a kit folder or a run directory")
    candidates = [path, path / "human" / f"{args.kind}-kit"]
    kit_dir = next((p for p in candidates if (p / "trials.csv").is_file() or (p / "clips.csv").is_file()), None)
    if kit_dir is None:
        raise EsnError(f"{path}: no listening kit here or in {candidates[1]}; run `esn human export` first")
    kit = read_kit(kit_dir)
    codes = None
    if args.codes is not None:
        from esn.pipeline.listening import private_dir, read_codes

        if args.codes.resolve().is_relative_to(kit_dir.resolve()):
            raise EsnError(f"--codes {args.codes} lies in the kit folder raters get; keep it in "
                           f"{private_dir(kit_dir)} (where `esn human export --raters N` writes it)")
        codes = read_codes(args.codes)
    access = access_for(args, token=None, secured=codes is not None,
                        fix="require raters' codes (--codes FILE from `esn human export --raters N`)")
    note(f"{kit.kind} kit {kit_dir} ({len(kit.trials)} trials); "
         + (f"{len(codes)} raters' codes required; " if codes else "")
         + f"answers go to {kit_dir / RESPONSES}/<rater>.csv; import them with `esn human import CONFIG --kind "
         f"{kit.kind} --kit {kit_dir} {kit_dir / RESPONSES}/*.csv`")
    serve(create_listening_app(kit, access=access, codes=codes), args.host, args.port, name="esn human serve",
          log_level=args.log_level)
    return 0
