"""Raw ring-buffer records for tests, without bcc: struct tt_event as ctypes, read from
bpf/tcptrace.h (as bcc derives it), and records built from events or from field values.

``raw_of(event)`` inverts ``from_raw`` for the events a recording holds, so every recording
of tests/data can be fed to the raw-batch decoders as the kernel would have sent it.
"""

from __future__ import annotations

import ctypes
import ipaddress
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any

from tcptrace.model.events import (
    AF_INET,
    AF_INET6,
    TW_HOW,
    CloseCall,
    Kind,
    SocketEvent,
    TimeWaitEvent,
    Touch,
    Transition,
)
from tcptrace.model.raw import HEADER

_CTYPES: dict[str, Any] = {
    "__u64": ctypes.c_uint64,
    "__s64": ctypes.c_int64,
    "__u32": ctypes.c_uint32,
    "__s32": ctypes.c_int32,
    "__u16": ctypes.c_uint16,
    "__u8": ctypes.c_uint8,
    "char": ctypes.c_char,
}


def _header() -> str:
    return (resources.files("tcptrace") / "bpf" / "tcptrace.h").read_text()


def event_struct() -> type[ctypes.Structure]:
    """struct tt_event as a ctypes Structure, member by member from bpf/tcptrace.h."""
    text = _header()
    defines = {m[1]: int(m[2]) for m in re.finditer(r"^#define\s+(TT_\w+)\s+(\d+)\b", text, re.M)}
    body = re.search(r"struct tt_event \{(.*?)\};", text, re.S)
    assert body is not None
    fields: list[tuple[str, Any]] = []
    for line in body[1].splitlines():
        line = re.sub(r"/\*.*?\*/", "", line).strip()
        if not line:
            continue
        m = re.fullmatch(r"(\w+)\s+(\w+)(?:\[(\w+)\])?;", line)
        assert m is not None, line
        ctype = _CTYPES[m[1]]
        if m[3]:
            ctype = ctype * (int(m[3]) if m[3].isdigit() else defines[m[3]])
        fields.append((m[2], ctype))
    return type("tt_event", (ctypes.Structure,), {"_fields_": fields})


EVENT = event_struct()
SIZE = ctypes.sizeof(EVENT)
STRIDE = HEADER + ((SIZE + 7) & ~7)


def record(values: Mapping[str, Any]) -> bytes:
    """One framed record (header, event, padding) with the given member values."""
    raw = EVENT()
    for name, value in values.items():
        current = getattr(raw, name)
        if isinstance(current, (bytes, ctypes.Array)):
            data = bytes(value)
            ctypes.memmove(ctypes.addressof(raw) + getattr(EVENT, name).offset, data, len(data))
        else:
            setattr(raw, name, value)
    return SIZE.to_bytes(4, "little") + bytes(4) + bytes(raw) + bytes(STRIDE - HEADER - SIZE)


def batch(records: Iterable[bytes]) -> bytes:
    return b"".join(records)


def struct_of(rec: bytes) -> Any:
    """The ctypes view of a framed record's event, as bcc hands it to from_raw."""
    return EVENT.from_buffer_copy(rec, HEADER)


def _addr(text: str, family: int) -> bytes:
    if not text:
        return bytes(16)
    packed = ipaddress.ip_address(text).packed
    return packed + bytes(16 - len(packed))


def raw_of(event: SocketEvent, kstack_id: int = -1, ustack_id: int = -1) -> dict[str, Any]:
    """Member values from which from_raw decodes ``event`` (stacks as the given ids)."""
    family = AF_INET6 if event.family == 6 else AF_INET
    values: dict[str, Any] = {
        "ts_ns": event.ts_ns,
        "skaddr": event.skaddr,
        "family": family,
        "saddr": _addr(event.saddr, family),
        "daddr": _addr(event.daddr, family),
        "sport": event.sport,
        "dport": event.dport,
        "owner_tgid": event.pid or 0,
        "owner_comm": (event.comm or "").encode(),
        "task_tgid": event.task_pid,
        "task_pid": event.task_tid,
        "task_comm": event.task_comm.encode(),
        "owner_cgroup": event.cgroup or 0,
        "netns": event.netns or 0,
        "owner_start_ns": event.pid_start_ns or 0,
        "kstack": kstack_id,
        "ustack": ustack_id,
    }
    if isinstance(event, Transition):
        values.update(
            kind=Kind.TRANSITION,
            oldstate=event.old,
            newstate=event.new,
            value_ns=event.prev_ns or 0,
            sk_flags=event.sk_flags,
        )
    elif isinstance(event, Touch):
        values.update(kind=Kind.TOUCH, op=event.op, ret=event.ret)
    elif isinstance(event, CloseCall):
        values.update(
            kind=Kind.CLOSE,
            op=event.op,
            value_ns=event.duration_ns,
            flags=int(event.flags),
            oldstate=event.state or 0,
            aux_ns=event.in_state_ns or 0,
            sk_flags=event.sk_flags,
            ret=event.ret,
        )
    elif isinstance(event, TimeWaitEvent):
        how = {name: value for value, name in TW_HOW.items()}
        values.update(
            kind=Kind.TIMEWAIT,
            op=event.what,
            newstate=event.substate or 0,
            oldstate=event.created_as or 0,
            value_ns=event.age_ns or 0,
            ret=how.get(event.how or "", 0),
        )
    return values
