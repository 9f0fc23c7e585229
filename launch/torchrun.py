"""``python -m distattn.launch.torchrun``: torchrun whose rendezvous stores listen only where they are told.

torchrun's ``c10d`` rendezvous hosts its ``TCPStore`` on every interface (``*:PORT``) whatever
``--rdzv-endpoint`` names, and so does the store the workers bootstrap from (``MASTER_PORT``): a
``localhost`` job is reachable from the network. ``TCPStore`` has no bind address, but it documents
``master_listen_fd``, a socket the caller has already bound. This entry point registers the
rendezvous backend :data:`BACKEND` through torchrun's documented handler registry -- ``c10d``
with the store on a socket bound to the endpoint's address -- and then runs torchrun unchanged::

    python -m distattn.launch.torchrun --rdzv-backend=distattn-c10d --rdzv-endpoint=127.0.0.1:29500 \\
        --local-addr=127.0.0.1 --nnodes=1 --nproc-per-node=4 -m distattn.cli train CONFIG

With ``--local-addr`` the workers' bootstrap store listens on that address too (one node: the
launcher passes the rendezvous host); without it, on every interface as torchrun does, because each
node of a multi-node job has its own address and the command line is the same on all of them.

SIGUSR1 (Slurm's ``--signal=USR1@SECONDS`` warning before the time limit) is passed on to the
workers, which checkpoint and exit 0 (:class:`distattn.train.ranks.StopSignal`); the agent then ends
as after any run whose workers succeeded. torchrun's own handlers cover SIGTERM, SIGINT, SIGHUP and
SIGQUIT only, and SIGUSR1's default action would end the agent at once -- Slurm signals every process
of the step, the agent included -- leaving srun to kill the workers before they saved.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
from datetime import timedelta
from typing import Sequence

BACKEND = "distattn-c10d"
DEFAULT_PORT = 29400  # torchrun's default for c10d endpoints without a port
_AGENT_STORE_TIMEOUT = timedelta(seconds=300)  # what torchrun gives the same store


def listening_socket(host: str, port: int) -> socket.socket | None:
    """A socket listening on ``host:port`` only (``port`` 0: any free port), or None when ``host`` is not
    an address of this machine or the port is taken -- then another process hosts the store."""
    family, sockaddr = _address(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart within TIME_WAIT rebinds
        sock.bind(sockaddr)
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EADDRINUSE):
            return None
        raise
    return sock


def _address(host: str, port: int) -> tuple[int, tuple]:
    """``(family, sockaddr)`` of ``host:port``; ``ValueError`` when the host does not resolve."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"the rendezvous host {host!r} does not resolve on this machine ({exc}); check "
                         f"--rdzv-host / --rdzv-endpoint") from None
    # IPv4 first: "localhost" often lists ::1 first, while the launcher and most clusters use IPv4
    family, _, _, _, sockaddr = sorted(infos, key=lambda info: info[0] != socket.AF_INET)[0]
    return family, sockaddr


def port_held(host: str, port: int) -> bool:
    """Whether another process listens on ``host:port`` of this machine (False where ``host`` is not one of
    its addresses: then another machine hosts the store)."""
    try:
        family, sockaddr = _address(host, port)
    except ValueError:   # torchrun says so itself
        return False
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the store binds: TIME_WAIT is free
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


class _Unparsed(Exception):
    pass


def check_rendezvous_port(argv: Sequence[str]) -> None:
    """``ValueError`` in one line when torchrun's command line ``argv`` runs one node that hosts the
    rendezvous store on a port another process already listens on. Without this the agent, unable to
    bind, connects to that process as a client and waits out the rendezvous timeout in silence (240 s and
    more). Only one node (``--nnodes 1``, what ``distattn launch`` passes without ``--nodes``): there the
    endpoint is this machine. With several, the first node hosts the store and this one may be a client;
    ``--standalone`` picks a free port itself."""
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint
    from torch.distributed.run import get_args_parser, get_rdzv_endpoint, parse_min_max_nnodes

    def stop(*_args, **_kwargs):
        raise _Unparsed

    parser = get_args_parser()
    parser.error = parser.exit = stop        # a bad command line (or --help): torchrun answers it itself
    parser.print_help = parser.print_usage = lambda *_args, **_kwargs: None
    try:
        args = parser.parse_args(list(argv))
        most = parse_min_max_nnodes(args.nnodes)[1]
        endpoint = get_rdzv_endpoint(args)
        host, port = parse_rendezvous_endpoint(endpoint, default_port=DEFAULT_PORT) if endpoint else (None, 0)
    except (_Unparsed, ValueError, RuntimeError):
        return
    if args.standalone or most != 1 or not port or not port_held(host, port):
        return
    how = "--master-port or MASTER_PORT" if args.rdzv_backend == "static" else f"--rdzv-endpoint {host}:PORT"
    raise ValueError(f"the rendezvous port {port} on {host} is already held by another process (another job? "
                     f"`ss -ltnp 'sport = :{port}'` names it), and this node must host the rendezvous there: "
                     f"choose a free port with `distattn launch --port PORT` (torchrun: {how}), or stop that "
                     f"process")


def server_store(sock: socket.socket, timeout: timedelta):
    """A server ``TCPStore`` on ``sock``, which it takes over (and closes when it goes)."""
    from torch.distributed import TCPStore

    host, port = sock.getsockname()[:2]
    return TCPStore(host, port, is_master=True, multi_tenant=True, timeout=timeout, master_listen_fd=sock.detach())


def _agent_store_server(master_addr: str, master_port: int):
    """Stands in for ``DynamicRendezvousHandler._create_tcp_store_server`` (the workers' MASTER_ADDR store)."""
    sock = listening_socket(master_addr, master_port)
    if sock is None:
        raise ValueError(f"--local-addr {master_addr}: cannot listen there (not an address of this machine, or "
                         f"port {master_port} is taken); pass this node's own address")
    return server_store(sock, _AGENT_STORE_TIMEOUT)


def _create_handler(params):
    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    class Backend(C10dRendezvousBackend):
        @property
        def name(self) -> str:  # torchrun checks that the handler's backend is the one asked for
            return BACKEND

    host, port = parse_rendezvous_endpoint(params.endpoint, default_port=DEFAULT_PORT)
    timeout = timedelta(seconds=params.get_as_int("read_timeout", 60))
    # whoever can bind the endpoint hosts the store, as c10d's own host check would decide
    sock = listening_socket(host, port)
    store = server_store(sock, timeout) if sock is not None else \
        TCPStore(host, port, is_master=False, multi_tenant=True, timeout=timeout)
    handler = create_handler(store, Backend(store, params.run_id), params)
    if params.local_addr:
        assert hasattr(handler, "_create_tcp_store_server"), "torch renamed the bootstrap store factory"
        handler._create_tcp_store_server = _agent_store_server
    return handler


def register() -> None:
    """Make ``--rdzv-backend=distattn-c10d`` known to torchrun in this process (idempotent)."""
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry

    rendezvous_handler_registry.register(BACKEND, _create_handler)


def children(parent: int) -> list[int]:
    """The processes whose parent is ``parent``, from ``/proc`` (Linux, where Slurm runs). torchrun
    starts each worker in a session of its own, so the agent's process group does not reach them."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                text = stat.read()
        except OSError:   # gone meanwhile
            continue
        # the command name (2nd field) may hold blanks and ')': the parent is 2nd after its last ')'
        if int(text.rsplit(")", 1)[1].split()[1]) == parent:
            found.append(int(entry))
    return found


def _pass_on(signum, frame) -> None:
    """The agent's SIGUSR1 handler: the workers get it (a second copy, when Slurm signalled the whole
    step, is harmless: a worker keeps the first), the agent keeps watching them."""
    for pid in children(os.getpid()):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def main(argv: list[str] | None = None) -> None:
    """torchrun's command line (``argv``, default ``sys.argv[1:]``) with :data:`BACKEND` available and
    SIGUSR1 passed on to the workers."""
    from torch.distributed.run import main as torchrun_main

    argv = sys.argv[1:] if argv is None else list(argv)
    try:   # before any rank starts: a held port would otherwise be minutes of silence
        check_rendezvous_port(argv)
    except ValueError as exc:
        print(f"distattn.launch.torchrun: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    register()
    signal.signal(signal.SIGUSR1, _pass_on)
    torchrun_main(argv)


if __name__ == "__main__":
    main()
