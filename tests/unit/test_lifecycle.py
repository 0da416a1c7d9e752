"""The socket table: owners and code paths per skaddr, reset when an address is reused."""

from __future__ import annotations

from tcptrace.model.events import Op, TcpState, Touch, Transition
from tcptrace.model.lifecycle import SocketTable, birth, process_op

S = TcpState


def tr(ts: int, sk: int, old: TcpState, new: TcpState, pid: int | None = None, **kw: object) -> Transition:
    base: dict[str, object] = dict(
        ts_ns=ts,
        skaddr=sk,
        saddr="10.0.0.1",
        sport=80,
        daddr="10.0.0.9",
        dport=40000,
        pid=pid,
        comm=None if pid is None else f"p{pid}",
        old=old,
        new=new,
    )
    base.update(kw)
    return Transition(**base)  # type: ignore[arg-type]


def touch(ts: int, sk: int, op: Op, pid: int, ret: int = 0, ustack: tuple[str, ...] = ()) -> Touch:
    return Touch(
        ts_ns=ts,
        skaddr=sk,
        saddr="0.0.0.0",
        sport=80,
        daddr="0.0.0.0",
        dport=40000,
        pid=pid,
        comm=f"p{pid}",
        task_pid=pid,
        op=op,
        ret=ret,
        ustack=ustack,
    )


def accepted(table: SocketTable, sk: int, pid: int, ts: int = 0, stack: str = "handler") -> None:
    table.feed(tr(ts + 1, sk, S.LISTEN, S.SYN_RECV, pid=pid))
    table.feed(tr(ts + 2, sk, S.SYN_RECV, S.ESTABLISHED, pid=pid))
    table.feed(touch(ts + 3, sk, Op.ACCEPT, pid, ustack=(stack,)))


def test_births_and_process_ops() -> None:
    assert birth(tr(0, 1, S.CLOSE, S.SYN_SENT)) and birth(tr(0, 1, S.LISTEN, S.SYN_RECV))
    assert not birth(tr(0, 1, S.ESTABLISHED, S.CLOSE_WAIT))
    assert process_op(tr(0, 1, S.CLOSE, S.SYN_SENT)) == Op.CONNECT
    assert process_op(tr(0, 1, S.CLOSE_WAIT, S.LAST_ACK)) == Op.CLOSE
    assert process_op(tr(0, 1, S.ESTABLISHED, S.CLOSE_WAIT)) is None


def test_accept_sets_owner_and_origin_and_close_removes() -> None:
    table = SocketTable()
    accepted(table, 0xA, pid=7)
    rec = table.get(0xA)
    assert rec is not None and rec.pid == 7 and rec.state == S.ESTABLISHED
    assert rec.origin is not None and rec.origin.op == Op.ACCEPT and rec.origin.ustack == ("handler",)
    # Touches carry no addresses: the ones learned from transitions stay.
    assert rec.saddr == "10.0.0.1" and rec.daddr == "10.0.0.9"
    table.feed(tr(10, 0xA, S.ESTABLISHED, S.CLOSE_WAIT))
    table.feed(touch(11, 0xA, Op.RECV, 7, ret=0))
    assert rec.eof_ns == 11 and rec.last_touch is not None and rec.last_touch.op == Op.RECV
    table.feed(tr(12, 0xA, S.CLOSE_WAIT, S.LAST_ACK, pid=7))
    assert rec.last_touch.op == Op.CLOSE
    record, _ = table.feed(tr(13, 0xA, S.LAST_ACK, S.CLOSE, pid=7))
    assert record is rec and table.get(0xA) is None and len(table) == 0


def test_reused_skaddr_never_inherits_the_old_owner_or_paths() -> None:
    table = SocketTable()
    accepted(table, 0xB, pid=7, stack="old_handler")
    table.feed(tr(10, 0xB, S.ESTABLISHED, S.CLOSE_WAIT))
    # The CLOSE of the old socket is lost; the address is reused by a connect of pid 9's...
    record, replaced = table.feed(tr(20, 0xB, S.CLOSE, S.SYN_SENT, pid=9))
    assert replaced is not None and replaced.pid == 7 and replaced.state == S.CLOSE_WAIT
    assert record is not None and record.pid == 9 and record.origin is not None
    assert record.origin.op == Op.CONNECT and record.eof_ns is None
    # ... and by a passive child with an unknown owner: nothing of pid 9 is kept either.
    record, _ = table.feed(tr(30, 0xB, S.LISTEN, S.SYN_RECV))
    assert record is not None and record.pid is None and record.origin is None and record.last_touch is None


def test_first_seen_socket_has_unknown_since_and_owner() -> None:
    table = SocketTable()
    record, replaced = table.feed(tr(5, 0xC, S.ESTABLISHED, S.CLOSE_WAIT))
    assert replaced is None and record is not None and record.pid is None and record.state == S.CLOSE_WAIT
    table.feed(touch(6, 0xC, Op.RECV, 42, ret=0))
    assert record.pid == 42 and record.eof_ns == 6


def test_table_is_bounded_like_the_kernel_lru() -> None:
    table = SocketTable(capacity=3)
    for sk in range(5):
        table.feed(tr(sk, sk, S.CLOSE, S.SYN_SENT, pid=1))
    assert len(table) == 3 and table.evicted == 2
    assert table.get(0) is None and table.get(4) is not None
