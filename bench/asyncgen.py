"""The other load shape: every client of a run in one process, each an `asyncio.Protocol` that takes
data as it arrives.

    python3 bench/asyncgen.py PROTOCOL PORT --server-pid PID [--clients 50 --senders 50 --rate 2000]
                              [--seconds 10] [--churn 20] [--sessions 3]

loadgen.py's Swarm spreads the clients over a few processes, each a selector
loop that reads a socket in large chunks when it gets round to it. A typical
bot framework or an independent load tool reads the way asyncio does: one
event loop, a `data_received()` for every arrival, however small. A server
whose cost depends on how it is read shows it between the two (bench/README.md:
"Two load shapes").

It speaks loadgen's protocols (pyChat, IRC, IRC over WebSocket) and uses its
tokens, so a delivery is the same thing under both shapes. With `--churn N`
it is the big room: besides the members, N people join each second (they
sign in and join) and N leave (they quit), and every member counts the joins
and leaves they were told of. With `--sessions K` (IRC and WebSocket, pyChat's
doors only), each of the clients is a person signed in K times to an
account of theirs: the first session makes the account (REGISTER, from an
address among 127.0.0.10 and up, five people an address as the server
allows), the others sign in to it with SASL, and every session is a
receiver. `--accounts` alone makes the accounts and signs each in once.

It measures the server over the stretch of traffic and the drain after it,
and prints one JSON line: deliveries, losses, latency, the server's CPU, its
own CPU, and the server's send system calls where perf can count them.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import socket
import sys
import time
from array import array

from loadgen import (HOST, PADDING, PROTOCOLS, check_order, complete_lines, deliveries_in, latency_profile,
                     newest_of_each, raise_file_limit)
from servers import SendCounter, process_cpu_seconds, process_status

SETUP_IN_FLIGHT = 8     # sign-ins at once while the room fills: under ngircd's listen backlog of 10
SIGN_IN_TIMEOUT_S = 30.0
SETTLE_QUIET_S = 0.3    # the room has filled once nothing has arrived for this long...
SETTLE_LONGEST_S = 20.0  # ...or this long has passed
DRAIN_TIMEOUT_S = 5.0
TIMED_RECEIVERS = 50    # whose every line is timed: enough for a p99, and the rest of a big room costs less
ACCOUNTS_PER_ADDRESS = 5    # the server's REGISTRATIONS_PER_ADDRESS

# Who came and went, as each protocol tells a member: the churners are called cN.
JOINS = {"pychat": re.compile(rb"\n\*\*\* c(\d+) joined #"), "irc": re.compile(rb"\n:c(\d+)!\S* JOIN ")}
LEAVES = {"pychat": re.compile(rb"\n\*\*\* c(\d+) quit"), "irc": re.compile(rb"\n:c(\d+)!\S* QUIT")}
QUITS = {"pychat": b"/quit\n", "irc": b"QUIT :bye\r\n"}


def clock_us() -> int:
    return time.perf_counter_ns() // 1000


class Member(asyncio.Protocol):
    """One simulated person: what loadgen's protocols ask of a client (nick, inbox, stage, frames, send,
    signed_in, fail), on an asyncio transport."""

    def __init__(self, run: Run, ident: int, nick: bytes, introduction: bytes = b""):
        self.run = run
        self.introduction = introduction    # sent before NICK and USER (see loadgen.IrcProtocol.greeting)
        self.ident = ident
        self.nick = nick
        self.inbox = b""
        self.stage = 0
        self.frames = None
        self.transport: asyncio.Transport | None = None
        self.signing_in = True
        self.entered = run.loop.create_future()     # True once in the room; a failure's reason otherwise
        self.ledger: Ledger | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send(self.run.protocol.greeting(self))

    def send(self, data: bytes) -> None:
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        now = clock_us()
        self.run.last_arrival = now
        data = self.run.protocol.unframe(self, data)
        if self.signing_in:
            self.inbox += data
            self.run.protocol.advance(self)
        else:
            self.received(data, now)

    def signed_in(self, leftover: bytes) -> None:
        self.signing_in = False
        self.inbox = b"\n"      # the delivery patterns anchor on the newline before a line
        if not self.entered.done():
            self.entered.set_result(True)
        if leftover:
            self.received(leftover, clock_us())

    def fail(self, reason: str) -> None:
        if not self.entered.done():
            self.entered.set_result(reason)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc) -> None:
        if not self.entered.done():
            self.entered.set_result(f"closed by the server: {exc or 'end of stream'}")
        if self.ledger is not None and not self.run.leaving:
            self.ledger.dropped = True

    def received(self, data: bytes, now: int) -> None:
        complete = complete_lines(self, data)
        if not complete:
            return
        self.send(self.run.protocol.pongs(complete))
        if self.ledger is not None:
            self.ledger.receive(complete, now)


class Ledger:
    """What one member received: every token in order once, its latency, and who came and went."""

    def __init__(self, run: Run, member: Member, timed: bool = True, sibling: bool = False):
        self.run = run
        # The sender whose lines this connection does not count: its own person's, unless it is another
        # session of that person (SIBLING), to which its lines are delivered like anyone's.
        self.me = b"" if sibling else b"%d" % member.ident
        self.last: dict[bytes, int] = {}    # per sender (its ident as text), the last sequence number
        self.timed = timed
        self.latencies = array("q")
        self.delivered = self.malformed = self.duplicates = self.gaps = 0
        self.joins = array("q")     # the churners whose joins it was told of, and leaves
        self.leaves = array("q")
        self.dropped = False

    def receive(self, complete: bytes, now: int) -> None:
        run = self.run
        if run.churn and (b" JOIN " in complete or b" joined #" in complete):
            self.joins.extend(map(int, run.joins.findall(complete)))
        if run.churn and (b" QUIT" in complete or b" quit" in complete):
            self.leaves.extend(map(int, run.leaves.findall(complete)))
        # A chunk at a time, in C where it can be (as loadgen does): at 200x20 one process takes 400,000
        # deliveries a second.
        matches, malformed = deliveries_in(run.protocol, complete, self.me)
        self.malformed += malformed
        if not matches:
            return
        senders, seqs, sent_times = zip(*matches)
        if self.timed:
            self.latencies.extend(map(now.__sub__, map(int, sent_times)))
        self.delivered += len(matches)
        newest, counts = newest_of_each(senders, seqs)
        last = self.last
        for sender, seq in newest.items():
            previous = last.get(sender, 0)
            seq = int(seq)
            if seq - previous != counts[sender]:
                seq, duplicates, gaps = check_order(matches, sender, previous)
                self.duplicates += duplicates
                self.delivered -= duplicates    # a duplicate is no delivery
                self.gaps += gaps
            last[sender] = seq


class Run:
    """One run: the members fill the room, then talk (and come and go) for a while, then drain."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.loop = asyncio.get_running_loop()
        self.protocol = PROTOCOLS[args.protocol]
        kind = "pychat" if args.protocol == "pychat" else "irc"
        self.joins, self.leaves, self.quit = JOINS[kind], LEAVES[kind], self.protocol_wire(QUITS[kind])
        self.churn = args.churn
        self.leaving = False
        self.last_arrival = clock_us()
        self.sent: dict[bytes, int] = {}
        self.joined: set[int] = set()   # churners in the room who entered during the traffic
        self.left: set[int] = set()     # churners who quit during it
        self.failures: list[str] = []

    def protocol_wire(self, line: bytes) -> bytes:
        wire = getattr(self.protocol, "wire", None)
        return wire(line) if wire else line

    async def connect(self, ident: int, nick: bytes, timeout_s: float, introduction: bytes = b"",
                      address: str | None = None) -> Member | None:
        """A member signed in and in the room, or None (the reason is kept)."""
        member = Member(self, ident, nick, introduction)
        try:
            await self.loop.create_connection(lambda: member, HOST, self.args.port,
                                              local_addr=(address, 0) if address else None)
            outcome = await asyncio.wait_for(asyncio.shield(member.entered), timeout_s)
        except (OSError, asyncio.TimeoutError) as error:
            outcome = f"{type(error).__name__}: {error}"
        if outcome is not True:
            self.failures.append(f"{nick.decode()}: {outcome}")
            if member.transport is not None:
                member.transport.close()
            return None
        return member

    async def fill(self, count: int) -> list[Member]:
        """COUNT people in the room; with --sessions, each person's first sessions come first."""
        gate = asyncio.Semaphore(SETUP_IN_FLIGHT)
        sessions = self.args.sessions

        async def one(ident: int, session: int) -> Member | None:
            nick, introduction, address = b"b%d" % ident, b"", None
            password = b"bench-password-%d" % ident
            if self.args.accounts and session == 0:
                introduction = b"REGISTER * * %s\r\n" % password
                address = f"127.0.0.{10 + ident // ACCOUNTS_PER_ADDRESS}"
            elif sessions > 1:
                plain = base64.b64encode(b"%s\0%s\0%s" % (nick, nick, password))
                introduction = b"CAP REQ :sasl\r\nAUTHENTICATE PLAIN\r\nAUTHENTICATE %s\r\nCAP END\r\n" % plain
            async with gate:
                return await self.connect(ident, nick, SIGN_IN_TIMEOUT_S, introduction, address)

        members = []
        for session in range(sessions):     # the accounts are made before anyone signs in to them
            members += await asyncio.gather(*(one(ident, session) for ident in range(count)))
        return [member for member in members if member is not None]

    async def settle(self) -> None:
        """Wait until the joins of the room's filling have all arrived."""
        started = clock_us()
        while clock_us() - started < SETTLE_LONGEST_S * 1e6:
            if clock_us() - self.last_arrival > SETTLE_QUIET_S * 1e6:
                return
            await asyncio.sleep(0.05)

    async def talk(self, senders: list[Member], until: float) -> None:
        """RATE lines a second in all, round-robin over the senders, until the loop's clock says UNTIL."""
        rate, loop, say = self.args.rate, self.loop, self.protocol.say
        started, count = loop.time(), 0
        while loop.time() < until:
            due = int((loop.time() - started) * rate) + 1
            while count < due:
                sender = senders[count % len(senders)]
                ident = b"%d" % sender.ident
                seq = self.sent.get(ident, 0) + 1
                self.sent[ident] = seq
                sender.send(say(b"|%s.%d.%d|%s" % (ident, seq, clock_us(), PADDING)))
                count += 1
            await asyncio.sleep(max(0.0, started + count / rate - loop.time()))

    async def come_and_go(self, present: list[Member], until: float, first_ident: int) -> None:
        """CHURN people join and CHURN leave each second: one comes, and the one here longest goes."""
        loop, interval = self.loop, 1.0 / self.churn
        started, count, arrivals = loop.time(), 0, []

        async def arrive(ident: int) -> None:
            member = await self.connect(ident, b"c%d" % ident, SIGN_IN_TIMEOUT_S)
            if member is not None:
                present.append(member)
                self.joined.add(ident)

        while loop.time() < until:
            arrivals.append(asyncio.ensure_future(arrive(first_ident + count)))
            if present:
                leaver = present.pop(0)
                leaver.send(self.quit)
                leaver.transport.close()
                self.left.add(leaver.ident)
            count += 1
            await asyncio.sleep(max(0.0, started + count * interval - loop.time()))
        await asyncio.gather(*arrivals)

    async def drain(self, receivers: list[Member]) -> None:
        """Wait until every receiver has every line (or DRAIN_TIMEOUT_S)."""
        started = clock_us()
        while clock_us() - started < DRAIN_TIMEOUT_S * 1e6:
            if all(all(member.ledger.last.get(ident, 0) >= count or member.ledger.me == ident
                       for ident, count in self.sent.items()) for member in receivers):
                if not self.churn or clock_us() - self.last_arrival > SETTLE_QUIET_S * 1e6:
                    return
            await asyncio.sleep(0.02)

    async def go(self) -> dict:
        args = self.args
        rss_before = process_status(args.server_pid)["rss"]
        members = await self.fill(args.clients)
        if len(members) < 2 or len(members) < args.senders:
            return {"error": f"only {len(members)} of {args.clients} signed in: "
                             f"{self.failures[-1] if self.failures else 'no reason given'}"}
        churners = []
        if self.churn:
            # The room starts with a second's worth of people who will leave first.
            churners = [member for member in await asyncio.gather(
                *(self.connect(1_000_000 + ident, b"c%d" % (1_000_000 + ident), SIGN_IN_TIMEOUT_S)
                  for ident in range(self.churn))) if member is not None]
        await self.settle()
        rss_after = process_status(args.server_pid)["rss"]
        self.rss_growth = rss_after - rss_before if rss_after is not None and rss_before is not None else None
        for index, member in enumerate(members):
            member.ledger = Ledger(self, member, timed=index < TIMED_RECEIVERS, sibling=index >= args.clients)
        sends = SendCounter(args.server_pid)
        server_cpu, own_cpu, wall = process_cpu_seconds(args.server_pid), time.process_time(), time.perf_counter()
        until = self.loop.time() + args.seconds
        work = [self.talk(members[:args.senders], until)]
        if self.churn:
            work.append(self.come_and_go(churners, until, 0))
        await asyncio.gather(*work)
        await self.drain(members)
        wall = time.perf_counter() - wall
        server_cpu_after = process_cpu_seconds(args.server_pid)
        if server_cpu_after is None:
            return {"error": "the server died during the run"}
        server_cpu = server_cpu_after - server_cpu
        own_cpu = time.process_time() - own_cpu
        send_calls = sends.stop()
        self.leaving = True
        return self.summary(members, server_cpu, own_cpu, wall, send_calls)

    def summary(self, members: list[Member], server_cpu: float, own_cpu: float, wall: float,
                send_calls: int | None) -> dict:
        ledgers = [member.ledger for member in members]
        lines = sum(self.sent.values())
        expected = lines * (len(members) - 1)
        delivered = sum(ledger.delivered for ledger in ledgers)
        latencies = sorted(latency for ledger in ledgers for latency in ledger.latencies)
        told_joins = sum(len(self.joined.intersection(ledger.joins)) for ledger in ledgers)
        told_leaves = sum(len(self.left.intersection(ledger.leaves)) for ledger in ledgers)
        deliveries = delivered + told_joins + told_leaves
        return {
            "clients": len(members),
            "people": self.args.clients,
            "senders": self.args.senders,
            "rss_growth_kib_per_connection": self.rss_growth / 1024 / len(members)
            if self.rss_growth is not None else None,
            "lines_sent": lines,
            "expected": expected,
            "delivered": delivered,
            "deliveries": delivered,
            "lost": expected - delivered,
            "malformed": sum(ledger.malformed for ledger in ledgers),
            "duplicates": sum(ledger.duplicates for ledger in ledgers),
            "gaps": sum(ledger.gaps for ledger in ledgers),
            "dropped": sum(ledger.dropped for ledger in ledgers),
            "deliveries_per_s": delivered / self.args.seconds,
            "latency_ms": latency_profile(latencies),
            "joins": len(self.joined),
            "leaves": len(self.left),
            "joins_told_pct": 100 * told_joins / (len(self.joined) * len(members)) if self.joined else None,
            "leaves_told_pct": 100 * told_leaves / (len(self.left) * len(members)) if self.left else None,
            "all_deliveries": deliveries,
            "failed": len(self.failures),
            "failure": self.failures[-1] if self.failures else "",
            "server_cpu_s": server_cpu,
            "server_cpu_pct": 100 * server_cpu / wall,
            "generator_cpu_pct": [100 * own_cpu / wall],
            "server_sends": send_calls,
        }


async def main_async(args: argparse.Namespace) -> dict:
    return await Run(args).go()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("protocol", choices=sorted(PROTOCOLS))
    parser.add_argument("port", type=int)
    parser.add_argument("--server-pid", type=int, required=True, help="the server's process, to measure")
    parser.add_argument("--clients", type=int, default=50, help="members who stay, each one a receiver")
    parser.add_argument("--senders", type=int, default=50, help="the first SENDERS members talk")
    parser.add_argument("--rate", type=float, default=2000.0, help="lines a second, all senders together")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long they talk")
    parser.add_argument("--churn", type=int, default=0, help="people joining, and leaving, each second")
    parser.add_argument("--accounts", action="store_true", help="each person makes an account (REGISTER)")
    parser.add_argument("--sessions", type=int, default=1,
                        help="sessions of each person, signed in to its account (implies --accounts)")
    args = parser.parse_args(argv)
    args.accounts = args.accounts or args.sessions > 1
    if args.accounts and args.protocol == "pychat":
        parser.error("--accounts and --sessions speak IRC's REGISTER and SASL: irc or websocket")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_file_limit()
    result = asyncio.run(main_async(args))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
