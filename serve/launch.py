"""Run a real Triton Inference Server on an exported model repository, in the foreground.

    python serve/launch.py --model-repository model_repository

Uses ``tritonserver`` from PATH (NVIDIA's container) or the one in the
``nvidia-pytriton`` wheel; with the latter, ONNX models run through a python-backend
stand-in (see ``serve/standin.py``). Binds 127.0.0.1 unless ``--host`` says
otherwise, waits until every model is ready, prints the URLs, and shuts down
gracefully on Ctrl-C, SIGINT, SIGTERM or SIGHUP (a second one forces it). Exits
non-zero with Triton's reason when it cannot start, and when Triton dies.

While it serves, it supervises (``serve/supervisor.py``): a model whose backend
process dies is reloaded, and a new version exported into the repository (or a
version pinned with ``serve/versions.py``) is loaded without a restart.

Locked by default: Triton's control plane (loading and unloading models, configs,
shared memory, statistics, trace, logging) answers only requests carrying the
operators' key, read from --control-key-file, else the file $THREEGNET_CONTROL_KEY_FILE
names, else $THREEGNET_CONTROL_KEY, else made at random for this run (then only the
launcher itself can use it). Inference, health and metadata stay open unless
--inference-key-file is given too. Request bodies Triton cannot bound itself (over
--max-request-mb, or compressed) are refused by HAProxy in front of Triton's HTTP and gRPC
ports (Debian's haproxy; without it, only a loopback --host is served, uncapped). See
docs/security.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from serve.children import on_stop_signals
from serve.control import (
    CONTROL_KEY_HEADER,
    INFERENCE_KEY_HEADER,
    MAY_BE_PUBLIC,
    ControlKeyError,
    read_key,
    resolve_key,
)
from serve.endpoints import (
    EXIT_TIMEOUT_S,
    GRPC_PORT,
    HTTP_PORT,
    MAX_REQUEST_MB,
    METRICS_PORT,
    SUPERVISOR_METRICS_PORT,
)
from serve.front import MAX_REQUEST_MB_LIMIT
from serve.server import GrpcTls, ServerError, TritonServer

EXIT_CODES = """exit status:
  0    stopped by Ctrl-C, SIGINT, SIGTERM or SIGHUP after a graceful shutdown
  1    Triton could not start (the repository, a config.pbtxt, --host, a port in use, no haproxy
       for a --host other machines reach: the error line says which) or exited on its own, or
       its front did (the orchestrator restarts the server)
  2    bad arguments: equal ports, an unusable key file, TLS files that do not go together, a
       --max-request-mb out of range
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model-repository",
        required=True,
        help="folder written by export/to_onnx.py, or s3:// gs:// as:// (NVIDIA's container; Triton reads it)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--http-port", type=int, default=HTTP_PORT)
    p.add_argument("--grpc-port", type=int, default=GRPC_PORT)
    p.add_argument("--metrics-port", type=int, default=METRICS_PORT)
    p.add_argument(
        "--supervisor-metrics-port",
        type=int,
        default=SUPERVISOR_METRICS_PORT,
        help=f"the launcher's metrics: heals, rollouts, refused versions (default {SUPERVISOR_METRICS_PORT}; 0: off)",
    )
    p.add_argument("--tritonserver", help="path to a tritonserver executable (default: PATH, then the wheel's)")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for the models (default 300)")
    p.add_argument(
        "--exit-timeout",
        type=int,
        default=EXIT_TIMEOUT_S,
        help=f"seconds shutdown waits for clients (default {EXIT_TIMEOUT_S})",
    )
    p.add_argument("--quiet", action="store_true", help="do not echo Triton's log")
    p.add_argument("--log-verbose", type=int, default=0, help="Triton's --log-verbose level")
    p.add_argument(
        "--repository-poll-secs",
        type=float,
        default=2.0,
        help="seconds between looks for new versions in the repository (default 2; 0: never)",
    )
    p.add_argument(
        "--version-pins",
        type=Path,
        metavar="FILE",
        help="'MODEL VERSION' lines, read at every poll: serve that version of MODEL here, whatever its "
        "config's version_policy says (a canary; deploy/canary.py). Missing or empty: no pin",
    )
    p.add_argument("--no-self-heal", action="store_true", help="do not reload a model whose backend process died")
    lock = p.add_argument_group("security (docs/security.md)")
    lock.add_argument(
        "--control-key-file",
        metavar="FILE",
        help="the operators' key for the control plane (default: $THREEGNET_CONTROL_KEY_FILE, "
        "$THREEGNET_CONTROL_KEY, else a random key for this run)",
    )
    lock.add_argument(
        "--inference-key-file",
        metavar="FILE",
        help=f"also lock inference: clients send this key in the '{INFERENCE_KEY_HEADER}' header (default: open)",
    )
    lock.add_argument(
        "--public",
        nargs="+",
        default=[],
        choices=MAY_BE_PUBLIC,
        metavar="CATEGORY",
        help=f"leave these open to everyone ({', '.join(MAY_BE_PUBLIC)}); e.g. model-config for Triton's "
        "stock example clients. Loading models always needs the key",
    )
    lock.add_argument(
        "--max-request-mb",
        type=int,
        default=MAX_REQUEST_MB,
        help=f"the largest HTTP request body let through to Triton (default {MAX_REQUEST_MB}: a batch of 8 "
        "uploads); compressed bodies are refused whatever their size. 0: no cap and no haproxy in front",
    )
    lock.add_argument("--grpc-tls-cert", metavar="PEM", help="serve gRPC over TLS with this certificate")
    lock.add_argument("--grpc-tls-key", metavar="PEM", help="the certificate's private key")
    lock.add_argument(
        "--grpc-tls-client-ca", metavar="PEM", help="mutual TLS: only clients whose certificate this CA signed"
    )
    p.add_argument("triton_args", nargs=argparse.REMAINDER, help="after --: more tritonserver flags")
    return p.parse_args(argv)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    extra = args.triton_args[1:] if args.triton_args[:1] == ["--"] else args.triton_args
    ports = [args.http_port, args.grpc_port, args.metrics_port]
    if args.supervisor_metrics_port:
        ports.append(args.supervisor_metrics_port)
    if len(set(ports)) < len(ports):
        log(
            f"error: the ports must differ: --http-port {args.http_port}, --grpc-port {args.grpc_port}, "
            f"--metrics-port {args.metrics_port}, --supervisor-metrics-port {args.supervisor_metrics_port}"
        )
        return 2
    if not 0 <= args.max_request_mb <= MAX_REQUEST_MB_LIMIT:
        log(f"error: --max-request-mb {args.max_request_mb}: from 0 (no cap) to {MAX_REQUEST_MB_LIMIT}")
        return 2
    if bool(args.grpc_tls_cert) != bool(args.grpc_tls_key) or (args.grpc_tls_client_ca and not args.grpc_tls_cert):
        log("error: gRPC TLS needs both --grpc-tls-cert and --grpc-tls-key (and them for --grpc-tls-client-ca)")
        return 2
    try:
        control_key, key_origin = resolve_key(args.control_key_file)
        inference_key = read_key(args.inference_key_file, "inference key") if args.inference_key_file else None
    except ControlKeyError as e:
        log(f"error: {e}")
        return 2
    tls = None
    if args.grpc_tls_cert:
        ca = Path(args.grpc_tls_client_ca) if args.grpc_tls_client_ca else None
        tls = GrpcTls(Path(args.grpc_tls_cert), Path(args.grpc_tls_key), ca)
    server = TritonServer(
        args.model_repository,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        server=args.tritonserver,
        log=None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True)),
        log_verbose=args.log_verbose,
        exit_timeout=args.exit_timeout,
        extra_args=extra,
        heal=not args.no_self_heal,
        poll_secs=args.repository_poll_secs,
        control_key=control_key,
        inference_key=inference_key,
        grpc_tls=tls,
        public=tuple(args.public),
        supervisor_metrics_port=args.supervisor_metrics_port or None,
        pins=args.version_pins,
        max_request_mb=args.max_request_mb,
    )
    stopping = []

    def shutdown(signum: int) -> None:
        if server.supervisor is not None:
            server.supervisor.stop(wait=False)  # stubs exiting now are no crash to heal
        running = server.process is not None and server.process.poll() is None
        if not stopping:
            stopping.append(signum)
            log(
                f"\n{signal.Signals(signum).name}: shutting Triton down gracefully (it waits up to "
                f"{args.exit_timeout} s for in-flight requests and open connections; a second signal forces it)"
            )
            if running:
                server.process.send_signal(signal.SIGTERM)
        elif running:
            log("forcing Triton to stop")
            os.killpg(server.process.pid, signal.SIGKILL)

    on_stop_signals(shutdown)
    try:
        server.start()
        log(f"starting {server.binary.executable} ({server.binary.origin}) on {args.model_repository}")
        if server.standin_models:
            log(
                f"no onnxruntime backend here: serving {', '.join(server.standin_models)} through onnxruntime "
                "in the python backend"
            )
        if not server.secrets_hidden:
            log("warning: no C compiler to build serve/secret_args.c: the keys are on tritonserver's command line, "
                "readable by every local user (install gcc, or set $THREEGNET_SECRET_ARGS_LIB)")  # fmt: skip
        server.wait_ready(args.timeout)
    except ServerError as e:
        if stopping:  # told to stop while starting: Triton's exit is the stop, not a failure
            final = server.stop()
            log("Triton stopped.")
            return final or 0
        log(f"error: {e}")
        return 1
    if stopping:
        return server.stop() or 0
    models = ", ".join(f"{m['name']} (v{m.get('version', '?')})" for m in server.models())
    locked = f"Locked: {', '.join(server.lock.restricted)} need the '{CONTROL_KEY_HEADER}' header ({key_origin})"
    if inference_key:
        locked += f"; inference needs the '{INFERENCE_KEY_HEADER}' header"
    if tls:
        locked += "; gRPC over mutual TLS" if tls.client_ca else "; gRPC over TLS"
    if server.front is not None:
        locked += f".\nRequest bodies: at most {args.max_request_mb} MiB, none compressed (haproxy in front of Triton)"
    else:
        locked += ".\nRequest bodies: NOT capped (no haproxy in front of Triton)"
    log(
        f"\nTriton is ready. Models: {models}\n"
        f"  HTTP     http://{server.http_url}  (KServe v2: /v2/models/<name>/infer)\n"
        f"  gRPC     {server.grpc_url}\n"
        f"  metrics  {server.metrics_url}"
        f"{f' (Triton), {server.supervisor_metrics_url} (supervisor)' if server.supervisor_metrics_url else ''}\n"
        f"{locked}.\n"
        "Ctrl-C to stop."
    )
    status = server.process.wait()
    front = server.front.process.poll() if server.front is not None and server.front.process is not None else None
    final = server.stop()
    if not stopping:
        if front is not None:
            log(f"error: the request front (haproxy) exited with status {front}; Triton was stopped with it")
            return 1
        log(f"error: tritonserver exited on its own with status {status}")
        return 1 if status == 0 else status
    log("Triton stopped.")
    return final or 0


if __name__ == "__main__":
    sys.exit(main())
