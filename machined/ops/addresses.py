"""A machine's IP addresses, from its network namespace over netlink
(systemd's local_addresses()).

The network namespace is joined by a short-lived thread of our own:
setns(CLONE_NEWNET) changes only the calling thread; the thread opens a
netlink socket there and ends, and the socket stays in that namespace.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading

from imagepool.errors import Errno, NoPrivateNetworking, NotSupported
from machined import nsexec
from machined.machine import Machine, MachineClass
from machined.ops.leader import Leader, oserror

_NETLINK_ROUTE = 0
_RTM_NEWADDR = 20
_RTM_GETADDR = 22
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_IFA_ADDRESS = 1
_IFA_LOCAL = 2
_IFA_F_DEPRECATED = 0x20
_RT_SCOPE_HOST = 254
_RT_SCOPE_NOWHERE = 255
_NLMSG_HDR = struct.Struct("=IHHII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _dump_addresses(sock: socket.socket) -> list[tuple[int, int, bytes]]:
    """systemd's local_addresses(NULL, 0, AF_UNSPEC): every address except
    deprecated ones and those of host or nowhere scope (so no loopback),
    IPv4 first, then by scope, interface index and address."""
    seq = 1
    request = _NLMSG_HDR.pack(_NLMSG_HDR.size + _IFADDRMSG.size, _RTM_GETADDR, _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0)
    request += _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    sock.sendto(request, (0, 0))
    found: list[tuple[int, int, int, bytes]] = []
    done = False
    while not done:
        data = sock.recv(1 << 16)
        offset = 0
        while offset + _NLMSG_HDR.size <= len(data):
            length, mtype, _flags, mseq, _pid = _NLMSG_HDR.unpack_from(data, offset)
            if length < _NLMSG_HDR.size:
                raise Errno(errno.EBADMSG)
            body = data[offset + _NLMSG_HDR.size:offset + length]
            offset += _align4(length)
            if mseq != seq:
                continue
            if mtype == _NLMSG_DONE:
                done = True
                break
            if mtype == _NLMSG_ERROR:
                code = -struct.unpack_from("=i", body)[0]
                if code:
                    raise Errno(code)
                continue
            if mtype != _RTM_NEWADDR or len(body) < _IFADDRMSG.size:
                continue
            family, _plen, flags, scope, ifindex = _IFADDRMSG.unpack_from(body)
            if flags & _IFA_F_DEPRECATED or scope in (_RT_SCOPE_HOST, _RT_SCOPE_NOWHERE):
                continue
            size = {socket.AF_INET: 4, socket.AF_INET6: 16}.get(family)
            if size is None:
                continue
            attrs: dict[int, bytes] = {}
            pos = _IFADDRMSG.size
            while pos + _RTATTR.size <= len(body):
                alen, atype = _RTATTR.unpack_from(body, pos)
                if alen < _RTATTR.size:
                    break
                attrs[atype] = body[pos + _RTATTR.size:pos + alen]
                pos += _align4(alen)
            address = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
            if address is None or len(address) != size:
                continue
            found.append((family, scope, ifindex, address))
    found.sort(key=lambda a: (0 if a[0] == socket.AF_INET else 1, a[1], a[2], a[3]))
    return [(ifindex, family, address) for family, _scope, ifindex, address in found]


def _netlink_socket() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_ROUTE)


def _netlink_socket_in(netns_fd: int) -> socket.socket:
    """A netlink socket in another network namespace, made by a thread that
    joins the namespace (which changes that thread only) and then ends."""
    result: dict[str, object] = {}

    def run() -> None:
        try:
            nsexec.setns(netns_fd, nsexec.CLONE_NEWNET)
            result["sock"] = _netlink_socket()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            result["error"] = e

    thread = threading.Thread(target=run, name="machined-netns")
    thread.start()
    thread.join()
    if "error" in result:
        error = result["error"]
        if isinstance(error, OSError):
            raise oserror(error)
        raise error  # type: ignore[misc]
    return result["sock"]  # type: ignore[return-value]


def get_addresses(m: Machine) -> list[tuple[int, int, bytes]]:
    """(ifindex, family, address bytes) of each address of the machine."""
    if m.is_host:
        with _netlink_socket() as sock:
            return _dump_addresses(sock)
    if m.machine_class != MachineClass.CONTAINER:
        raise NotSupported("Requesting IP address data is only supported on container machines.")
    with Leader(m) as leader:
        try:
            if leader.ns_link("net") == os.readlink("/proc/self/ns/net"):
                raise NoPrivateNetworking(f"Machine {m.name} does not use private networking")
            netns = leader.open("ns/net")
        except OSError as e:
            raise oserror(e) from None
    try:
        sock = _netlink_socket_in(netns)
    finally:
        os.close(netns)
    with sock:
        return _dump_addresses(sock)
