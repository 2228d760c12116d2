"""``seglabel serve --labelstudio``: flags -> a loaded model behind Label Studio's ML backend
protocol (serve/). The model flags are annotate's own (the same option objects, so the same
names, defaults and help), and the model is built the same way (``recipe.check`` /
``recipe.prepare``), so the pre-labels equal what ``seglabel annotate`` writes.

Registered in cli.py with ``app.command("serve")(serve_command(annotate))``.
"""
from __future__ import annotations

import errno
import inspect
import logging
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

import typer

from . import exitcodes
from .cli_handler import flag, guarded, option
from .errors import UsageError, one_line

SERVER = "Server"
# annotate's flags that decide the labels; serve takes them as annotate declares them
MODEL_FLAGS = ("labels", "model", "pretrained", "model_config", "cache_dir", "method", "proxy", "proxy_weights",
               "regions", "logit_scale", "key_smoothing", "prompt_denoising", "protocol_name", "short_side",
               "max_long_side", "window", "window_stride", "tta", "pamr", "min_confidence", "max_pixels", "device",
               "precision")


def serve_command(annotate: Callable[..., None]) -> Callable[..., None]:
    same = {name: p.default for name, p in inspect.signature(annotate).parameters.items() if name in MODEL_FLAGS}

    @guarded
    def serve(
        ctx: typer.Context,
        labelstudio: bool = flag("--labelstudio", panel=SERVER, help="Speak Label Studio's ML backend protocol "
                                 "(/health, /setup, /predict, /webhook); the one protocol for now."),
        host: str = option("127.0.0.1", "--host", panel=SERVER, help="Address to listen on (127.0.0.1: this "
                           "machine only; 0.0.0.0: every interface, then use --basic-auth)."),
        port: int = option(9090, "--port", panel=SERVER, min=0, max=65535, help="Port (0: any free one; the "
                           "address is printed)."),
        basic_auth: Optional[str] = option(None, "--basic-auth", panel=SERVER, envvar="SEGLABEL_SERVE_BASIC_AUTH",
                                           help="USER:PASSWORD every request must carry (Label Studio sends it when "
                                           "the model is connected with basic auth)."),
        document_root: Optional[Path] = option(None, "--document-root", panel=SERVER, help="Label Studio's "
                                               "LOCAL_FILES_DOCUMENT_ROOT: local-files images are read from under "
                                               "it, nowhere else."),
        labelstudio_url: Optional[str] = option(None, "--labelstudio-url", panel=SERVER, envvar="LABEL_STUDIO_URL",
                                                help="Label Studio's address: other images are read from it (and "
                                                "only from it)."),
        labelstudio_token: Optional[str] = option(None, "--labelstudio-token", panel=SERVER,
                                                  envvar="LABEL_STUDIO_API_KEY", help="Its API token (legacy token)."),
        labels: Path = same["labels"],
        model: str = same["model"],
        pretrained: str = same["pretrained"],
        model_config: Optional[Path] = same["model_config"],
        cache_dir: Optional[str] = same["cache_dir"],
        method: Optional[str] = same["method"],
        proxy: Optional[str] = same["proxy"],
        proxy_weights: Optional[str] = same["proxy_weights"],
        regions: Optional[str] = same["regions"],
        logit_scale: Optional[float] = same["logit_scale"],
        key_smoothing: Optional[bool] = same["key_smoothing"],
        prompt_denoising: Optional[bool] = same["prompt_denoising"],
        protocol_name: str = same["protocol_name"],
        short_side: int = same["short_side"],
        max_long_side: int = same["max_long_side"],
        window: int = same["window"],
        window_stride: int = same["window_stride"],
        tta: bool = same["tta"],
        pamr: bool = same["pamr"],
        min_confidence: Optional[float] = same["min_confidence"],
        max_pixels: int = same["max_pixels"],
        device: str = same["device"],
        precision: str = same["precision"],
    ) -> int:
        """Serve pre-labels to Label Studio as an ML backend: annotate's labels, as people open tasks."""
        from .annotate import AnnotateConfig
        from .predict import Protocol
        from .recipe import PROTOCOL_FIELDS, Recipe, check, prepare
        from .serve import Backend, ImageSource

        if not labelstudio:
            raise UsageError("give --labelstudio (the protocol to serve: Label Studio's ML backend)")
        auth = _basic_auth(basic_auth)
        if document_root is None and not labelstudio_url:
            raise UsageError("give --document-root (Label Studio's LOCAL_FILES_DOCUMENT_ROOT) or --labelstudio-url "
                             "with its token: where the tasks' images are read")
        source = ImageSource(document_root, labelstudio_url, labelstudio_token)
        server = _bind(host, port, auth)  # a busy port is refused before the model is loaded
        try:
            with tempfile.TemporaryDirectory(prefix="seglabel-serve-") as scratch:  # annotate's checks want an --out
                config = AnnotateConfig(out=Path(scratch), min_confidence=min_confidence, max_pixels=max_pixels,
                                        protocol=Protocol(short_side, max_long_side, window, window_stride, tta,
                                                          pamr=pamr), precision=precision, workers=0)
                recipe = Recipe(
                    labels=labels, config=config, model=model, pretrained=pretrained,
                    model_config=str(model_config) if model_config else None, cache_dir=cache_dir, device=device,
                    method=method, logit_scale=logit_scale, key_smoothing=key_smoothing,
                    prompt_denoising=prompt_denoising, protocol_name=protocol_name,
                    model_options={k: v for k, v in (("proxy", proxy), ("proxy_weights", proxy_weights),
                                                     ("regions", regions)) if v is not None},
                    explicit=frozenset(f for f in PROTOCOL_FIELDS
                                       if getattr(ctx.get_parameter_source(f), "name", "") == "COMMANDLINE"))
                ready = prepare(recipe, check(recipe))
            server.backend = Backend(ready.segmenter, ready.labelset, ready.config, source)
            _log_to_stderr()
            if host not in ("127.0.0.1", "localhost", "::1") and auth is None:
                logging.getLogger("seglabel").warning("listening on %s without --basic-auth: anyone who reaches "
                                                      "this address can use the model", host)
            typer.echo(f"Label Studio ML backend at {server.url} (model_version {server.backend.model_version}; "
                       f"images from {source.describe()}); connect it in the project's Settings > Model. "
                       "Ctrl-C stops it.", err=True)
            typer.echo(server.url)
            sys.stdout.flush()
            server.serve_forever()
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the normal way to stop a server
            typer.echo("stopped", err=True)
        finally:
            server.server_close()
        return exitcodes.OK

    return serve


def _basic_auth(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise UsageError("--basic-auth: give USER:PASSWORD, both non-empty")
    return user, password


def _bind(host: str, port: int, auth: tuple[str, str] | None):
    from .serve import BackendServer

    try:
        return BackendServer(None, host, port, auth)
    except OSError as e:
        why = "already in use" if e.errno == errno.EADDRINUSE else (e.strerror or type(e).__name__).lower()
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({why})") from None


class _OneLine(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(f"seglabel: {record.levelname.lower()}: {one_line(record.getMessage())}", err=True)


def _log_to_stderr() -> None:
    logger = logging.getLogger("seglabel")
    if not any(isinstance(h, _OneLine) for h in logger.handlers):
        logger.addHandler(_OneLine(logging.INFO))
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a root handler some library set up would print each line twice
