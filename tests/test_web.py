"""The browser door (--web-port): its HTTP, IRC over WebSocket (RFC 6455 and IRCv3's subprotocols) under the
IRC door's limits, and the web client in web/ driven in a real headless Chromium.

The WebSocket side of every test is written here with the standard library, frame by frame, so that a test can
send what no browser would: unmasked frames, huge or endless ones, invalid UTF-8.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (ROOT, SERVER_SCRIPT, TIMEOUT, IrcClient, LineClient, import_script, script_command,
                      seconds_until_closed, shown, talk_until_cut_off)

WEB = ROOT / "web"
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def web_port(server) -> int:
    """The web port of a server started with --web-port 0."""
    return int(server.wait_for_log(r"listening for browsers on https?://\S+:(\d+)/").group(1))


def http_exchange(server, request: bytes, tls: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    """Send a raw REQUEST to SERVER's web port; the status, the headers (lower-case names) and the body of the
    answer, read until the server closes."""
    sock = socket.create_connection((server.host, web_port(server)), timeout=TIMEOUT)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname="localhost")
    try:
        sock.sendall(request)
        data = b""
        deadline = time.monotonic() + TIMEOUT
        while chunk := sock.recv(65536):
            data += chunk
            assert time.monotonic() < deadline, f"the server did not close after its answer: {data[:300]!r}"
    finally:
        sock.close()
    return parse_response(data)


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, separator, body = data.partition(b"\r\n\r\n")
    assert separator, f"no complete HTTP answer: {data[:300]!r}"
    status_line, *lines = head.decode("ascii").split("\r\n")
    assert status_line.startswith("HTTP/1.1 "), status_line
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def get(server, path: str, *headers: str, method: str = "GET", host: str = "localhost") -> tuple[int, dict, bytes]:
    lines = [f"{method} {path} HTTP/1.1", *([f"Host: {host}"] if host else []), *headers, "", ""]
    return http_exchange(server, "\r\n".join(lines).encode("utf-8"))


def frame(opcode: int, payload: bytes = b"", fin: bool = True, masked: bool = True, rsv: int = 0) -> bytes:
    """One frame as a client sends it (masked unless told otherwise)."""
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    size = len(payload)
    mask_bit = 0x80 if masked else 0
    if size < 126:
        head = bytes((first, mask_bit | size))
    elif size < 65536:
        head = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, size)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(byte ^ key[n % 4] for n, byte in enumerate(payload))


class WebSocketClient(IrcClient):
    """An IRC client over a WebSocket to the web port: lines go out as masked frames and come back one a
    message; the rest of IrcClient (expect, register...) works on those lines."""

    def __init__(self, server, protocols: tuple[str, ...] = ("text.ircv3.net",), origin: str | None = None,
                 headers: tuple[str, ...] = (), source: str | None = None, tls: ssl.SSLContext | None = None) -> None:
        LineClient.__init__(self, server.host, web_port(server), tls, source=source)
        self.frames = b""               # bytes read and not yet made into frames
        self.control: list[tuple[int, bytes]] = []      # pings, pongs and the close frame, as they came
        self.opcodes: set[int] = set()
        key = base64.b64encode(os.urandom(16)).decode()
        lines = ["GET /socket HTTP/1.1", f"Host: localhost:{web_port(server)}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
                 *([f"Sec-WebSocket-Protocol: {', '.join(protocols)}"] if protocols else []),
                 *([f"Origin: {origin}"] if origin else []), *headers, "", ""]
        self.sock.sendall("\r\n".join(lines).encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = self._read_more(time.monotonic() + TIMEOUT, "the handshake's answer")
            assert chunk, f"closed during the handshake: {answer!r}"
            answer += chunk
        head, _, self.frames = answer.partition(b"\r\n\r\n")
        self.status, self.headers, _ = parse_response(head + b"\r\n\r\n")
        if self.status == 101:
            expected = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
            assert self.headers["sec-websocket-accept"] == expected

    def send(self, text: str) -> None:
        self.sock.sendall(frame(TEXT, text.encode("utf-8")))

    def next_frame(self, deadline: float) -> tuple[bool, int, bytes] | None:
        """The next frame from the server (None once it has closed the connection); it must be unmasked."""
        while True:
            if len(self.frames) >= 2:
                first, second = self.frames[0], self.frames[1]
                assert not second & 0x80, "the server masked a frame"
                size, start = second & 0x7F, 2
                if size == 126:
                    size, start = int.from_bytes(self.frames[2:4], "big"), 4
                elif size == 127:
                    size, start = int.from_bytes(self.frames[2:10], "big"), 10
                if len(self.frames) >= start + size and len(self.frames) >= start:
                    payload, self.frames = self.frames[start:start + size], self.frames[start + size:]
                    return bool(first & 0x80), first & 0x0F, payload
            data = self._read_more(deadline, "a frame")
            if not data:
                return None
            self.frames += data

    def recv_line(self, timeout: float = TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            got = self.next_frame(deadline)
            if got is None:
                pytest.fail(f"the server closed the connection; lines so far: {shown(self.seen)}; "
                            f"control frames: {self.control}")
            fin, opcode, payload = got
            if opcode in (TEXT, BINARY):
                assert fin, "the server fragmented a message"
                self.opcodes.add(opcode)
                line = payload.decode("utf-8")
                assert "\r" not in line and "\n" not in line, f"not one line per message: {line!r}"
                self.seen.append(line)
                return line
            self.control.append((opcode, payload))

    def close_code(self, timeout: float = TIMEOUT) -> tuple[int, str]:
        """Read until the server's close frame: its code and reason (every line before it stays in seen)."""
        deadline = time.monotonic() + timeout
        while not any(opcode == CLOSE for opcode, _ in self.control):
            got = self.next_frame(deadline)
            assert got is not None, f"closed without a close frame; lines: {shown(self.seen)}"
            fin, opcode, payload = got
            if opcode in (TEXT, BINARY):
                self.seen.append(payload.decode("utf-8", "replace"))
            else:
                self.control.append((opcode, payload))
        payload = next(payload for opcode, payload in self.control if opcode == CLOSE)
        return int.from_bytes(payload[:2], "big"), payload[2:].decode("utf-8")


@pytest.fixture
def web_connect():
    """A factory: web_connect(server, nick=None, **options) opens a WebSocket to SERVER's web port, registered
    as NICK over IRC if given."""
    opened: list[WebSocketClient] = []

    def open_client(server, nick: str | None = None, capabilities: tuple[str, ...] = (), **options) -> WebSocketClient:
        client = WebSocketClient(server, **options)
        opened.append(client)
        if nick is not None:
            assert client.status == 101, f"the handshake was refused: {client.status} {client.headers}"
            client.register(nick, capabilities)
        return client

    yield open_client
    for client in opened:
        client.close()


@pytest.fixture(scope="module")
def web_server(module_servers):
    """The module's shared server with a web port and an IRC port."""
    return module_servers("--web-port", "0", "--irc-port", "0")


# -- the framing, called directly ----------------------------------------------------------------------------

pychat = import_script(SERVER_SCRIPT, "pychat_server")


def test_the_reader_takes_frames_however_the_bytes_are_cut():
    answered = []
    reader = pychat.WebSocketReader(answered.append, lambda: True)
    stream = (frame(TEXT, "PRIVMSG #a :héllo".encode()) + frame(PING, b"p") + frame(BINARY, b"NICK b\r\n")
              + frame(TEXT, b"x" * 300, fin=False) + frame(0, b"y" * 7000)
              + frame(TEXT, b""))
    lines = []
    for n in range(0, len(stream), 3):
        lines += reader.feed(stream[n:n + 3])
    assert lines == ["PRIVMSG #a :héllo", "NICK b", "x" * 300 + "y" * 7000, ""]
    assert answered == [pychat.websocket_frame(PONG, b"p")]
    assert not reader.buffer and not reader.message


@pytest.mark.parametrize("size, head", [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)])
def test_a_servers_frame_has_the_shortest_length_that_fits(size, head):
    made = pychat.websocket_frame(TEXT, b"a" * size)
    assert len(made) == head + size and made[0] == 0x81 and not made[1] & 0x80


def test_irc_lines_become_one_message_each():
    assert pychat.websocket_messages(b"one\r\ntwo words\r\n", BINARY) == b"\x82\x03one\x82\x09two words"
    assert pychat.websocket_messages(b"", TEXT) == b""


# -- HTTP ---------------------------------------------------------------------------------------------------

def test_the_web_client_is_served_with_its_security_and_caching_headers(web_server):
    status, headers, body = get(web_server, "/")
    assert status == 200, (status, body)
    assert body == (WEB / "index.html").read_bytes()
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["x-content-type-options"] == "nosniff"
    policy = headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy
    assert headers["cache-control"] == "no-cache" and headers["etag"]
    assert headers["connection"] == "close"
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css"), ("icon.svg", "image/svg+xml")):
        status, headers, body = get(web_server, f"/{name}?v=2")
        assert status == 200 and headers["content-type"].startswith(kind), (name, status, headers)
        assert body == (WEB / name).read_bytes()
    etag = get(web_server, "/app.js")[1]["etag"]
    status, headers, body = get(web_server, "/app.js", f"If-None-Match: {etag}")
    assert status == 304 and body == b"" and headers["etag"] == etag
    assert "content-length" not in headers, f"a 304 must not say a length other than the file's: {headers}"
    status, headers, body = get(web_server, "/app.js", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) == (WEB / "app.js").stat().st_size


@pytest.mark.parametrize("path", ["/nothing.html", "/../pyChat-server.py", "/%2e%2e/pyChat-server.py",
                                  "/..%2fpyChat-server.py", "//etc/passwd", "/web/", "/web/app.js", "/.git",
                                  "/./app.js", "/app.js/", "/tests", "/app.py", "/index.html%00.js",
                                  "/..\\pyChat-server.py", "http://localhost/../pyChat-server.py", "*"])
def test_nothing_but_the_client_files_is_served(web_server, path):
    status, headers, body = get(web_server, path)
    assert status == 404, (path, status, body[:200])
    assert b"pyChat server" not in body and b"root:" not in body
    assert headers["x-content-type-options"] == "nosniff"


def test_methods_other_than_get_and_head_are_refused(web_server):
    for method in ("POST", "PUT", "DELETE", "OPTIONS", "BREW"):
        status, headers, _ = get(web_server, "/", method=method)
        assert status == 405 and headers["allow"] == "GET, HEAD", (method, status)


@pytest.mark.parametrize("request_bytes, expected", [
    (b"GET / HTTP/1.1\r\n\r\n", 400),                                   # no Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),           # two
    (b"GET / HTTP/1.1\r\nHost: bad host!\r\n\r\n", 400),
    (b"GET /\r\nHost: localhost\r\n\r\n", 400),                         # HTTP/0.9
    (b"GET / HTTP/2.0\r\nHost: localhost\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: localhost\r\n folded: header\r\n\r\n", 400),
    (b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: localhost\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: localhost\r\nX-\xc3\xa9: y\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: localhost\r\nX: a\x1bb\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: localhost\r\nX: a\x7fb\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: localhost\r\n" + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: localhost\r\n" + b"X: y\r\n" * 100 + b"\r\n", 431),
], ids=["no-host", "two-hosts", "bad-host", "http-0.9", "http-2", "folded", "target-not-ascii",
        "name-not-ascii", "escape-in-value", "delete-in-value", "huge-header", "many-headers"])
def test_malformed_or_huge_requests_are_refused(web_server, request_bytes, expected):
    status, _, body = http_exchange(web_server, request_bytes)
    assert status == expected, (status, body)


def test_a_utf8_cookie_from_another_app_on_the_host_is_no_reason_to_refuse(web_server, web_connect):
    # A browser sends a host's cookies to every port of it, raw UTF-8 where another application set them so.
    cookie = "Cookie: greeting=caf\u00e9; name=\u5c71\u7530"
    status, _, body = get(web_server, "/", cookie)
    assert status == 200, (status, body)
    client = web_connect(web_server, origin=None, headers=(cookie,))
    assert client.status == 101, (client.status, client.headers)


def test_the_log_writes_every_control_character_as_an_escape():
    record = logging.LogRecord("pychat", logging.WARNING, __file__, 1, "%s", ("a\x1b[2J\tb\x9bc\x7f\r\nd",), None)
    written = pychat.LogFormat().format(record)
    assert written.endswith(r" WARNING a\x1b[2J\x09b\x9bc\x7f  | d"), written


def test_a_request_target_cannot_write_terminal_escapes_into_the_log(start_server):
    server = start_server("--web-port", "0")
    status, _, _ = http_exchange(server, b"GET /app.js?\x1b]0;owned\x07\x1b[2J\x1b[31mFAKE_ERROR HTTP/1.1\r\n"
                                         b"Host: localhost\r\n\r\n")
    assert status == 200
    served = server.wait_for_log(r"served GET /app\.js.*").group(0)
    assert served.endswith(r"?\x1b]0;owned\x07\x1b[2J\x1b[31mFAKE_ERROR"), served
    assert not re.search("[\x00-\x1f\x7f-\x9f]", server.log().replace("\n", "")), repr(server.log()[-300:])


def test_slow_or_endless_headers_are_cut_off(start_server):
    server = start_server("--web-port", "0", "--nick-timeout", "2")
    sock = socket.create_connection((server.host, web_port(server)), timeout=TIMEOUT)
    try:
        took = seconds_until_closed(sock, b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 40, most=6)
    finally:
        sock.close()
    assert took is not None and took < 4, f"a request dribbled for {took} s was not cut off at 2 s"
    server.wait_for_log(r"HTTP 408")


# -- the WebSocket handshake ------------------------------------------------------------------------------------

@pytest.mark.parametrize("offered, chosen, opcode", [
    (("binary.ircv3.net", "text.ircv3.net"), "binary.ircv3.net", BINARY),
    (("text.ircv3.net", "binary.ircv3.net"), "text.ircv3.net", TEXT),
    (("chat", "binary.ircv3.net"), "binary.ircv3.net", BINARY),
    ((), None, TEXT),                                   # gamja asks for none: text
    (("chat",), None, TEXT),
])
def test_the_subprotocol_is_the_clients_first_that_the_server_speaks(web_server, web_connect, offered, chosen, opcode):
    client = web_connect(web_server, protocols=offered)
    assert client.status == 101
    assert client.headers.get("sec-websocket-protocol") == chosen
    client.register(f"sub{opcode}")
    assert client.opcodes == {opcode}


@pytest.mark.parametrize("headers, expected", [
    (("Sec-WebSocket-Version: 8",), 426),
    (("Sec-WebSocket-Key: short",), 400),
    (("Origin: http://evil.example",), 403),
    (("Origin: null",), 403),
])
def test_a_bad_handshake_is_refused(web_server, headers, expected):
    port = web_port(web_server)
    base = {"Host": f"localhost:{port}", "Upgrade": "websocket", "Connection": "keep-alive, Upgrade",
            "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode(), "Sec-WebSocket-Version": "13"}
    for header in headers:
        name, _, value = header.partition(": ")
        base[name] = value
    lines = ["GET /socket HTTP/1.1", *(f"{name}: {value}" for name, value in base.items()), "", ""]
    status, _, body = http_exchange(web_server, "\r\n".join(lines).encode())
    assert status == expected, (headers, status, body)


def test_the_socket_needs_an_upgrade_and_get(web_server):
    assert get(web_server, "/socket")[0] == 426
    assert get(web_server, "/socket", method="POST")[0] == 405


def test_a_page_of_the_same_host_may_open_the_socket_and_web_origin_names_others(start_server, web_server, web_connect):
    port = web_port(web_server)
    assert web_connect(web_server, origin=f"http://localhost:{port}").status == 101
    assert web_connect(web_server, origin=f"https://localhost:{port}").status == 101
    assert web_connect(web_server, origin="http://localhost:1").status == 403
    other = start_server("--web-port", "0", "--web-origin", "https://chat.example.org, http://app.example:8080")
    assert web_connect(other, origin="https://chat.example.org").status == 101
    assert web_connect(other, origin="http://app.example:8080").status == 101
    assert web_connect(other, origin=f"http://localhost:{web_port(other)}").status == 403


# -- WebSocket frames -------------------------------------------------------------------------------------------

def test_pings_are_answered_and_irc_works_as_on_the_irc_port(web_server, web_connect):
    client = web_connect(web_server, "pinger", capabilities=("server-time", "echo-message"))
    client.send_raw(frame(PING, b"are you there"))
    client.send("PING :token")
    client.expect(r"PONG \S+ token")
    assert (PONG, b"are you there") in client.control
    client.send("PRIVMSG #lobby :hello\r\n")           # a CR LF at the end is taken off
    echoed = client.expect(r"PRIVMSG #lobby :hello$")
    assert echoed.startswith("@time=")


def test_labeled_replies_are_one_message_a_line(web_server, web_connect):
    client = web_connect(web_server, "labels", capabilities=("labeled-response", "batch", "message-tags"))
    client.send("@label=one PING :x")
    assert re.match(r"@label=one :\S+ PONG \S+ x$", client.expect(r"PONG ")), client.seen[-1]
    client.send("@label=two WHOIS labels")
    start = client.expect(r"BATCH \+(\S+) labeled-response")
    assert start.startswith("@label=two ")
    batch = re.search(r"BATCH \+(\S+)", start).group(1)
    lines = client.lines_until(rf"BATCH -{batch}")
    assert len(lines) > 3 and all(line.startswith(f"@batch={batch}") for line in lines[:-1]), lines


def test_fragmented_messages_are_joined(web_server, web_connect):
    client = web_connect(web_server, "fragments", capabilities=("echo-message",))
    client.send_raw(frame(TEXT, b"PRIVMSG #lo", fin=False) + frame(PING, b"p") + frame(0, b"bby :in ", fin=False)
                    + frame(0, b"three parts"))
    client.expect(r"PRIVMSG #lobby :in three parts$")
    assert (PONG, b"p") in client.control


@pytest.mark.parametrize("data, code", [
    (frame(TEXT, b"NICK x", masked=False), 1002),                          # a client's frames must be masked
    (frame(TEXT, b"x", rsv=4), 1002),                                       # no extension was agreed
    (frame(0x3, b"x"), 1002),                                               # no such opcode
    (frame(0, b"x"), 1002),                                                 # a continuation of nothing
    (frame(TEXT, b"a", fin=False) + frame(TEXT, b"b"), 1002),              # a message inside another
    (frame(PING, b"x" * 126), 1002),                                        # a control frame too big
    (frame(TEXT, b"NICK \xff\xfe"), 1007),                                  # text that is not UTF-8
    (frame(TEXT, b"NICK a\r\nUSER a 0 * a"), 1002),                        # two lines in one message
    (struct.pack("!BBQ", 0x81, 0xFF, 1 << 40) + b"mask", 1009),           # a terabyte announced
    (frame(BINARY, b"x" * 9000), 1009),                                     # longer than an IRC line may be
    (frame(CLOSE, b"\x03\xed"), 1002),                                      # 1005 may not be sent
])
def test_a_frame_that_breaks_the_rules_closes_with_its_code(web_server, web_connect, data, code):
    client = web_connect(web_server)
    client.send_raw(data)
    got, reason = client.close_code()
    assert got == code, (got, reason)
    assert reason
    client.wait_closed()


def test_frames_sent_before_the_handshake_is_answered_are_refused(web_server):
    sock = socket.create_connection((web_server.host, web_port(web_server)), timeout=TIMEOUT)
    try:
        sock.sendall(b"GET /socket HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                     + frame(TEXT, b"NICK early") + frame(TEXT, b"USER early 0 * :x"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    finally:
        sock.close()
    assert data.startswith(b"HTTP/1.1 101 ") and b"\x88" in data, data
    assert data.endswith(struct.pack("!H", 1002) + b"frames sent before the handshake was answered"), data


def test_a_message_that_never_ends_is_cut_off(web_server, web_connect):
    client = web_connect(web_server)
    client.send_raw(frame(TEXT, b"PRIVMSG #lobby :", fin=False) + b"".join(frame(0, b"a", fin=False)
                                                                            for _ in range(200)))
    assert client.close_code()[0] == 1008
    client.wait_closed()


def test_a_client_close_is_answered_with_its_code(web_server, web_connect):
    client = web_connect(web_server, "closer")
    client.send_raw(frame(CLOSE, struct.pack("!H", 1000) + b"bye"))
    assert client.close_code()[0] == 1000
    client.wait_closed()
    web_server.wait_for_log(r"closer@127\.0\.0\.1 left: WebSocket closed by the client \(1000\)")


def test_the_lines_sent_just_before_the_close_frame_are_handled_first(start_server, connect, web_connect):
    # "Send, then close the tab": the last message (or a QUIT with its reason) and the close frame come in
    # one read, and both count.
    server = start_server("--web-port", "0")
    alice = connect(server, "alice")
    last_words = web_connect(server, "webby")
    alice.expect(r"\*\*\* webby joined #lobby")
    last_words.send_raw(frame(TEXT, b"PRIVMSG #lobby :my last words") + frame(CLOSE, struct.pack("!H", 1001)))
    assert last_words.close_code()[0] == 1001
    lines = alice.lines_until(r"\*\*\* webby (quit|left)")
    assert any("webby: my last words" in line for line in lines), lines
    server.wait_for_log(r"webby@127\.0\.0\.1 left: WebSocket closed by the client \(1001\)")
    quitter = web_connect(server, "quitter")
    alice.expect(r"\*\*\* quitter joined #lobby")
    quitter.send_raw(frame(TEXT, b"QUIT :gone for lunch") + frame(CLOSE, struct.pack("!H", 1000)))
    quitter.close_code()
    quit_line = alice.expect(r"\*\*\* quitter (quit|left)")
    assert "gone for lunch" in quit_line, quit_line
    # Still signing in: the close is acted on at once, not after the sign-in's clock runs out.
    signing_in = web_connect(server)
    signing_in.send_raw(frame(TEXT, b"NICK halfway") + frame(CLOSE, struct.pack("!H", 1000)))
    assert signing_in.close_code(timeout=5)[0] == 1000


def test_the_close_frame_says_why_the_server_closed(start_server, web_connect):
    server = start_server("--web-port", "0", "--idle-timeout", "2")
    client = web_connect(server, "idler")
    code, reason = client.close_code(timeout=10)        # the idle timeout is the stimulus
    error = next(line for line in client.seen if line.startswith("ERROR :"))
    assert (code, reason) == (1008, error.removeprefix("ERROR :")), (code, reason, error)
    assert "Nothing said for 2 s" in reason, reason


def test_a_close_reason_is_cut_to_a_control_frame_on_a_character_boundary():
    payload = pychat.websocket_close_frame(1008, "é" * 100)[2:]
    assert len(payload) == 2 + 122 and payload[2:].decode("utf-8") == "é" * 61, payload


def test_invalid_utf8_in_a_binary_message_gets_the_irc_ports_answer(web_server, web_connect):
    client = web_connect(web_server, "bytes", protocols=("binary.ircv3.net",))
    client.send_raw(frame(BINARY, b"PRIVMSG #lobby :caf\xe9"))
    client.expect(r"FAIL PRIVMSG INVALID_UTF8 ")
    client.send("PING :still-here")
    client.expect(r"PONG \S+ still-here")


def test_a_flood_of_tiny_frames_is_cut_off_by_flood_control(web_server, web_connect):
    client = web_connect(web_server, "tiny")
    client.send_raw(frame(PING) * 3000)
    code, _ = client.close_code()
    assert code == 1008
    assert any(re.search(r"ERROR :Closing link: tiny \(Flooding", line) for line in client.seen), shown(client.seen)


def test_a_websocket_ping_is_answered_while_lines_are_over_the_rate(start_server, web_connect):
    # A keepalive, as IRC's PING is: a paste past the burst (20) and within the flood margin does not stop it.
    server = start_server("--web-port", "0")
    client = web_connect(server, "busy")
    for n in range(25):
        client.send(f"PRIVMSG #lobby :line {n}")
    client.expect(r".*too fast")
    client.send_raw(frame(PING, b"alive?") + frame(PONG, b"unasked"))
    client.send("PING :irc-alive")
    client.expect(r"PONG \S+ irc-alive")      # read past the answer to the ping, which comes before it
    assert (PONG, b"alive?") in client.control, client.control


def test_the_sign_in_clock_runs_from_the_connection(start_server, web_connect):
    server = start_server("--web-port", "0", "--nick-timeout", "1.5")
    client = web_connect(server)
    client.send("CAP LS 302")
    started = time.monotonic()
    assert client.close_code(timeout=4)[0] == 1008
    assert time.monotonic() - started < 3
    assert any("ERROR :Closing link" in line for line in client.seen), shown(client.seen)


# -- one chat, three doors ----------------------------------------------------------------------------------------

def test_a_browser_user_an_irc_user_and_a_pychat_user_talk_in_one_room(web_server, web_connect, connect, irc_connect):
    alice = connect(web_server, "alice")
    irc = irc_connect(web_server, "ircbob")
    web = web_connect(web_server, "webcarol", capabilities=("message-tags", "server-time"))
    alice.expect(r"\*\*\* webcarol joined #lobby")
    web.send("PRIVMSG #lobby :hi from the browser")
    alice.expect(r"webcarol: hi from the browser")
    irc.expect(r"PRIVMSG #lobby :hi from the browser")
    alice.send("hi from the terminal")
    web.expect(r"PRIVMSG #lobby :hi from the terminal")
    irc.send("PRIVMSG #lobby :\x01ACTION waves\x01")
    web.expect(r"PRIVMSG #lobby :\x01ACTION waves\x01")
    alice.expect(r"\* ircbob waves")
    web.send("PRIVMSG alice :a secret")
    alice.expect(r".*webcarol.*a secret")
    web.send("WHOIS webcarol")
    web.expect(r"3\d\d webcarol webcarol .*")


def test_the_door_limits_count_the_web_port_with_the_others(start_server, web_connect, connect, irc_connect):
    server = start_server("--web-port", "0", "--irc-port", "0", "--max-per-ip", "2", "--op-password", "sesame")
    operator = connect(server, "warden")
    irc = irc_connect(server, "ircuser")
    refused = web_connect(server)
    assert refused.status == 503, refused.status
    server.wait_for_log(r"refused 127\.0\.0\.1: Too many connections from your address")
    irc.close()
    operator.send("/op sesame")
    operator.expect(r"-- You are now an operator")
    operator.send("/ban 127.0.0.2 10m testing")
    operator.expect(r"-- Banned .*127\.0\.0\.2")
    banned = web_connect(server, source="127.0.0.2")
    assert banned.status == 503, banned.status
    server.wait_for_log(r"refused 127\.0\.0\.2: .*[Bb]an")


def test_a_trusted_proxy_gives_the_persons_address_and_no_one_else_can(start_server, web_connect):
    server = start_server("--web-port", "0", "--trust-proxy", "127.0.0.1", "--max-per-ip", "2")
    # The proxy puts the address it got the request from last; what came before it is the client's say-so.
    first = web_connect(server, "first", headers=("X-Forwarded-For: 198.51.100.7, 203.0.113.1",))
    second = web_connect(server, "second", headers=("X-Forwarded-For: 203.0.113.2",))
    third = web_connect(server, "third", headers=("X-Forwarded-For: 203.0.113.2",))
    server.wait_for_log(r"WebSocket from 203\.0\.113\.1 ")
    server.wait_for_log(r"WebSocket from 203\.0\.113\.2 ")
    again = web_connect(server, headers=("X-Forwarded-For: 203.0.113.2",))
    assert again.status == 503
    server.wait_for_log(r"refused 203\.0\.113\.2 \(through 127\.0\.0\.1\): Too many connections")
    assert get(server, "/", "X-Forwarded-For: nonsense")[0] == 400
    # From anyone but the proxy, X-Forwarded-For is only a header: 127.0.0.2 is counted as itself.
    elsewhere = web_connect(server, "elsewhere", source="127.0.0.2", headers=("X-Forwarded-For: 203.0.113.9",))
    server.wait_for_log(r"WebSocket from 127\.0\.0\.2 ")
    for client in (first, second, third, elsewhere):
        client.send("PING :x")
        client.expect("PONG")


def test_a_browser_that_stops_reading_is_cut_off_and_everyone_else_carries_on(start_server, connect, web_connect):
    server = start_server("--web-port", "0", "--rate", "0", "--max-queue", "65536")
    speaker = connect(server, "speaker")
    listener = connect(server, "listener")
    stalled = WebSocketClient(server)
    try:
        stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.register("stalled")
        talk_until_cut_off(server, speaker, listener, "stalled")
    finally:
        stalled.close()


def test_https_and_wss_with_the_servers_certificate(start_server, web_connect, tmp_path):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a throwaway certificate")
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", "key.pem", "-out", "cert.pem", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], cwd=tmp_path, check=True, capture_output=True,
                   timeout=30)
    server = start_server("--web-port", "0", "--tls-cert", str(tmp_path / "cert.pem"),
                          "--tls-key", str(tmp_path / "key.pem"))
    server.wait_for_log(r"listening for browsers on https://")
    context = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
    status, _, body = http_exchange(server, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", tls=context)
    assert status == 200 and body == (WEB / "index.html").read_bytes()
    web_connect(server, "secure", tls=context).send("PING :tls")
    status, _, body = get(server, "/")
    assert status == 400 and b"HTTPS" in body, (status, body)


# -- options ------------------------------------------------------------------------------------------------------

def test_the_web_options_are_in_help_and_round_trip_through_the_configuration_file(tmp_path):
    def run(*args: str) -> str:
        return subprocess.run(script_command(SERVER_SCRIPT, *args), capture_output=True, text=True, check=True,
                              timeout=30).stdout

    help_text = run("--help")
    for option in ("--web-port", "--web-origin", "--trust-proxy"):
        assert option in help_text
    printed = run("--web-port", "8080", "--web-origin", "https://Chat.example.org/", "--trust-proxy", "::1",
                  "--print-config")
    assert "web-port = 8080" in printed and "web-origin = https://chat.example.org" in printed
    assert "trust-proxy = ::1" in printed
    (tmp_path / "pychat.ini").write_text(printed)
    assert run("--config", str(tmp_path / "pychat.ini"), "--print-config") == printed
    refused = subprocess.run(script_command(SERVER_SCRIPT, "--trust-proxy", "proxy.example"), capture_output=True,
                             text=True, timeout=30)
    assert refused.returncode == 2 and "not an IP address" in refused.stderr


# -- the web client in a real browser ----------------------------------------------------------------------------

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
CHROMEDRIVER = next(filter(None, ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None,
                                  shutil.which("chromedriver"))), None)
SCREENSHOTS = Path(os.environ.get("PYCHAT_SCREENSHOTS", ROOT / "tests" / "artifacts" / "web"))
WIDE, PHONE = (1000, 700), (360, 740)


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module's browser tests, through the system's chromedriver (given by its
    path, so that Selenium never tries to download one)."""
    # CI installs both, and sets PYCHAT_REQUIRE_BROWSER so that these tests cannot be skipped there unseen.
    missing = pytest.fail if os.environ.get("PYCHAT_REQUIRE_BROWSER") else pytest.skip
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("the browser tests need Selenium: pip install -r requirements-dev.txt")
    if CHROMIUM is None or CHROMEDRIVER is None:
        missing("the browser tests need Chromium and its driver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-extensions", "--no-first-run", f"--window-size={WIDE[0]},{WIDE[1]}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


class Page:
    """The web client in the browser, as a person uses it: what they see and what they type."""

    def __init__(self, driver, server) -> None:
        from selenium.webdriver.common.by import By
        self.driver, self.By = driver, By
        driver.set_window_size(*WIDE)
        driver.get(f"http://127.0.0.1:{web_port(server)}/")
        driver.get_log("browser")           # what an earlier page logged

    def find(self, css: str):
        return self.driver.find_element(self.By.CSS_SELECTOR, css)

    def all(self, css: str) -> list:
        return self.driver.find_elements(self.By.CSS_SELECTOR, css)

    def wait(self, condition, what: str, timeout: float = TIMEOUT):
        """Wait until CONDITION() is true; fail saying WHAT, with the page's lines and status."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = condition()
            except Exception:       # an element replaced while it was read: look again
                result = None
            if result:
                return result
            if time.monotonic() > deadline:
                pytest.fail(f"the page never showed {what}; status {self.status()!r}, rooms {self.rooms()}, "
                            f"lines {shown(self.lines())}, console {self.driver.get_log('browser')}")
            time.sleep(0.05)

    def status(self) -> str:
        return self.find("#status").text

    def lines(self) -> list[str]:
        return [line.text for line in self.all("#log li")]

    def rooms(self) -> dict[str, str]:
        """Each room's name in the list, with its unread count ('' for none)."""
        return {button.get_attribute("data-room"): button.find_element(self.By.CSS_SELECTOR, ".unread").text
                for button in self.all("#rooms button")}

    def current(self) -> str:
        return self.find("#rooms button[aria-current=true]").get_attribute("data-room")

    def sign_in(self, nick: str, password: str = "", expect_success: bool = True, code: str = "") -> None:
        if code and not self.find("#more").get_attribute("open"):
            self.find("#more summary").click()
        fields = (("#nick", nick), ("#password", password)) + ((("#code", code),) if code else ())
        for field, value in fields:
            self.find(field).clear()
            self.find(field).send_keys(value)
        self.find("#signin-button").click()
        if expect_success:
            self.wait(lambda: self.status() == f"Connected as {nick}", f"{nick} signed in")
            self.wait(lambda: self.current() == "#lobby", "#lobby")

    def type(self, text: str, enter: bool = True) -> None:
        from selenium.webdriver.common.keys import Keys
        self.find("#input").send_keys(text + (Keys.ENTER if enter else ""))

    def wait_for_line(self, pattern: str) -> str:
        return self.wait(lambda: next((line for line in self.lines() if re.search(pattern, line)), None),
                         f"a line matching {pattern!r}")

    def screenshot(self, name: str) -> None:
        self.driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def test_the_browser_signs_in_and_talks_with_a_pychat_user(start_server, connect, browser):
    server = start_server("--web-port", "0")
    alice = connect(server, "alice")
    page = Page(browser, server)
    page.sign_in("webby")
    alice.expect(r"\*\*\* webby joined #lobby")
    alice.send("hello webby, see https://example.org/a?b=1")
    line = page.wait_for_line(r"alice: hello webby")
    mention = page.find("#log li.mention")
    assert "hello webby" in mention.text, line
    links = [a.get_attribute("href") for a in page.all("#log a")]
    assert links == ["https://example.org/a?b=1"], links
    page.type("hi alice")
    alice.expect(r"webby: hi alice")
    page.wait_for_line(r"webby: hi alice")
    page.screenshot("chat")
    assert not [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def test_a_registered_name_signs_in_with_its_password_and_a_wrong_one_is_said(start_server, connect, browser):
    server = start_server("--web-port", "0", "--guess-delay", "0")
    carol = connect(server, "carol")
    carol.send("/register correct-horse-9")
    carol.expect(r"-- Registered ", timeout=10)
    carol.send("/quit")
    carol.wait_closed()
    page = Page(browser, server)
    page.sign_in("carol", "wrong-horse-9", expect_success=False)
    error = page.wait(lambda: page.find("#signin-error").text, "why the sign-in failed")
    assert "password" in error.lower() and page.find("#signin").is_displayed(), error
    page.sign_in("carol", "correct-horse-9")
    page.type("/online")                     # pyChat's own command, through the service
    page.wait_for_line(r"\d+ online")
    page.type("/help")
    page.wait_for_line(r"/join #room \[key\] +join a room")


def test_an_invited_person_makes_their_account_in_the_browser_and_is_signed_in_to_it_after_a_restart(
        start_server, connect, browser, tmp_path):
    from test_accounts import claim_operator
    port = str(free_port())
    options = ("--web-port", port, "--data-dir", str(tmp_path / "data"), "--private", "--operator", "alice",
               "--guess-delay", "0.05")
    server = start_server(*options)
    alice = claim_operator(server, connect(server))
    alice.send("/invite-account webby")
    code = re.match(r"-- Invitation for webby: (\S+) ", alice.expect("-- ")).group(1)
    page = Page(browser, server)
    page.sign_in("stranger", "a long pass phrase 7", expect_success=False)
    error = page.wait(lambda: page.find("#signin-error").text, "why a stranger may not come in")
    assert "private" in error, error
    page.sign_in("webby", "", expect_success=False, code=code)
    assert "password" in page.wait(lambda: page.find("#signin-error").text, "a password asked for")
    page.sign_in("webby", "a long pass phrase 7", expect_success=False, code="not-the-code")
    error = page.wait(lambda: page.find("#signin-error").text, "the wrong code said")
    assert "Wrong code" in error, error
    page.sign_in("webby", "a long pass phrase 7", code=code)
    assert page.find("#code").get_attribute("value") == "", "the spent code is forgotten"
    alice.send("/whois webby")
    assert alice.expect("-- webby: ") == "-- webby: account webby"
    server.stop()
    page.wait(lambda: "reconnecting in" in page.status(), "the reconnection's countdown")
    server = start_server(*options)
    page.wait(lambda: page.status() == "Connected as webby", "signed in again, with the password", timeout=10)
    assert code not in server.log() and "a long pass phrase 7" not in server.log()


def test_the_browser_joins_a_room_counts_unread_lines_and_keeps_drafts(start_server, connect, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    server = start_server("--web-port", "0", "--irc-port", "0")
    alice = connect(server, "alice")
    page = Page(browser, server)
    page.sign_in("webby")
    page.type("/join #dev")
    page.wait(lambda: page.current() == "#dev", "#dev joined and shown")
    alice.send("/join #dev")
    page.wait(lambda: "alice" in page.find("#member-list").text, "alice among #dev's members")
    page.type("half-typed", enter=False)
    alice.send("/msg webby psst")
    page.wait(lambda: page.rooms().get("alice") == "1", "one unread line from alice")
    # held across the renders that follow: the list is updated in place, so a press is never lost
    alice_button = page.find("#rooms button[data-room='alice']")
    alice.send("/join #lobby")              # back to talking in #lobby, where she still is
    alice.send("here too, webby")
    page.wait(lambda: page.rooms().get("#lobby") == "1", "one unread line in #lobby")
    assert "mention" in page.find("#rooms button[data-room='#lobby'] .unread").get_attribute("class")
    page.screenshot("rooms")
    ActionChains(browser).key_down(Keys.ALT).send_keys("2").key_up(Keys.ALT).perform()
    page.wait(lambda: page.current() == "#lobby", "Alt-2 switched to #lobby")
    assert page.rooms()["#lobby"] == "" and page.find("#input").get_attribute("value") == ""
    alice_button.click()
    page.wait_for_line(r"alice: psst")
    page.type("secret answer")
    alice.expect(r".*webby.*secret answer")
    page.find("#rooms button[data-room='#dev']").click()
    page.wait(lambda: page.find("#input").get_attribute("value") == "half-typed", "the draft of #dev kept")
    page.find("#input").clear()
    page.type("al", enter=False)
    page.type(Keys.TAB, enter=False)
    assert page.find("#input").get_attribute("value") == "alice: "
    page.type("tab completed")
    alice.expect(r"#dev webby: alice: tab completed|webby: alice: tab completed")


def test_two_browser_users_a_terminal_user_and_an_irc_user_talk_in_two_rooms(start_server, connect, irc_connect,
                                                                              browser):
    server = start_server("--web-port", "0", "--irc-port", "0")
    alice = connect(server, "alice")
    bob = irc_connect(server, "ircbob")
    first_tab = browser.current_window_handle
    webby = Page(browser, server)
    webby.sign_in("webby")
    browser.switch_to.new_window("tab")
    second_tab = browser.current_window_handle
    try:
        webbie = Page(browser, server)
        webbie.sign_in("webbie")
        for client in (alice, bob):
            client.send("/join #dev" if client is alice else "JOIN #dev")
        webbie.type("/join #dev")
        webbie.wait(lambda: {"alice", "ircbob", "webbie"} <= {name.lstrip("@+") for name in
                                                             webbie.find("#member-list").text.split()},
                    "everyone but webby in #dev")
        browser.switch_to.window(first_tab)
        webby.type("/join #dev")
        webby.wait(lambda: "webbie" in webby.find("#member-list").text, "webbie among #dev's members")
        webby.type("hello #dev from webby")
        alice.expect(r"(#dev )?webby: hello #dev from webby")
        bob.expect(r"PRIVMSG #dev :hello #dev from webby")
        alice.send("/msg #lobby the terminal in #lobby")
        bob.send("PRIVMSG #dev :irc in #dev")
        webby.wait_for_line(r"ircbob: irc in #dev")
        webby.wait(lambda: webby.rooms().get("#lobby") == "1", "the terminal's #lobby line unread")
        browser.switch_to.window(second_tab)
        webbie.wait_for_line(r"webby: hello #dev from webby")
        webbie.wait_for_line(r"ircbob: irc in #dev")
        webbie.find("#rooms button[data-room='#lobby']").click()
        webbie.wait_for_line(r"alice: the terminal in #lobby")
        webbie.type("webbie answers in #lobby")
        alice.expect(r"(#lobby )?webbie: webbie answers in #lobby")
        bob.expect(r"PRIVMSG #lobby :webbie answers in #lobby")
    finally:
        browser.switch_to.window(second_tab)
        browser.close()
        browser.switch_to.window(first_tab)
    webby.find("#rooms button[data-room='#lobby']").click()
    webby.wait_for_line(r"webbie: webbie answers in #lobby")
    assert webby.rooms()["#dev"] == "", "#dev read while it was shown"


def test_what_others_say_is_only_ever_text(start_server, connect, irc_connect, browser):
    server = start_server("--web-port", "0", "--irc-port", "0")
    page = Page(browser, server)
    page.sign_in("webby")
    alice = connect(server, "alice")
    irc = irc_connect(server, "mallory")
    attacks = ['<img src=x onerror="document.title=\'pwned\'">', "javascript:alert(document.domain)",
               '<a href="javascript:alert(1)">click</a>', "<script>document.title='pwned'</script>",
               "https://example.org/\"><img src=x onerror=alert(1)>"]
    for text in attacks:
        alice.send(text)
    irc.send("PRIVMSG #lobby :\x1b[2J\x1b[31mred\x03" + "4colour \x02bold")
    page.wait_for_line(r"mallory: .*red")
    for text in attacks[:4]:
        page.wait_for_line(re.escape(f"alice: {text}"))
    assert not page.all("#log img, #log script, #log iframe")
    hrefs = [a.get_attribute("href") for a in page.all("#log a")]
    assert hrefs and all(href.startswith("https://example.org/") for href in hrefs), hrefs
    assert browser.title != "pwned" and "pwned" not in browser.title
    page.screenshot("inert")


def test_the_room_list_is_a_drawer_on_a_phone(start_server, browser):
    server = start_server("--web-port", "0")
    page = Page(browser, server)
    browser.set_window_size(*PHONE)
    page.sign_in("phone")
    width = browser.execute_script("return document.documentElement.clientWidth")
    assert width <= PHONE[0]
    assert browser.execute_script("return document.documentElement.scrollWidth") <= width, "wider than the phone"
    sidebar_right = lambda: browser.execute_script(
        "return document.getElementById('sidebar').getBoundingClientRect().right")
    assert sidebar_right() <= 0, "the room list shows beside the messages on a phone"
    assert page.find("#menu").is_displayed() and page.find("#input").is_displayed()
    page.screenshot("phone")
    page.find("#menu").click()
    page.wait(lambda: sidebar_right() > 200, "the drawer opened")
    page.screenshot("phone-drawer")
    page.find("#rooms button[data-room='#lobby']").click()
    page.wait(lambda: sidebar_right() <= 0, "the drawer closed after choosing a room")


# Each element's text colour and the colour behind it (the first ancestor with a background), as [r, g, b].
COLOURS_SCRIPT = """
const rgb = text => (text.match(/[\\d.]+/g) || []).map(Number);
return [...document.querySelectorAll(arguments[0])].filter(e => e.offsetParent !== null).map(e => {
  let back = e;
  while (back && (getComputedStyle(back).backgroundColor === "rgba(0, 0, 0, 0)")) back = back.parentElement;
  const behind = getComputedStyle(back || document.body).backgroundColor;
  return [e.textContent.slice(0, 30), rgb(getComputedStyle(e).color), rgb(behind)];
});
"""


def contrast(one: list[float], other: list[float]) -> float:
    """WCAG 2's contrast ratio of two sRGB colours."""
    def luminance(colour: list[float]) -> float:
        linear = [c / 255 / 12.92 if c / 255 <= 0.04045 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in colour[:3]]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    high, low = sorted((luminance(one), luminance(other)), reverse=True)
    return (high + 0.05) / (low + 0.05)


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_light_and_dark_follow_the_system_and_every_text_is_readable(start_server, connect, browser, scheme):
    server = start_server("--web-port", "0")
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia",
                            {"features": [{"name": "prefers-color-scheme", "value": scheme}]})
    try:
        page = Page(browser, server)
        page.sign_in("webby")
        alice = connect(server, "alice")
        for nick in ("bob", "carol", "dave", "erin"):
            connect(server, nick)
        alice.send("hello webby, https://example.org/")
        alice.send("/me waves")
        page.wait_for_line(r"\* alice waves")
        page.type("/away lunch")
        page.wait_for_line("away")
        page.wait(lambda: page.find("#member-list li.away").text == "webby", "webby shown as away")
        background = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
        dark = sum(map(float, re.findall(r"[\d.]+", background)[:3])) < 3 * 128
        assert dark == (scheme == "dark"), background
        low = []
        for selector in ("#log .time", "#log .body", "#log .nick", "#log a", "#status", "#title", "#rooms .name",
                         "#rooms .unread", "#member-list span", "#members-title", "#input", "button"):
            for text, colour, behind in browser.execute_script(COLOURS_SCRIPT, selector):
                if contrast(colour, behind) < 4.5:
                    low.append((selector, text, colour, behind, round(contrast(colour, behind), 2)))
        page.screenshot(f"chat-{scheme}")
        assert not low, f"text under 4.5:1 in the {scheme} theme: {low}"
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


IRC_FRAMEWORK = ROOT / "tests" / "irc-framework"


def irc_framework(server, subprotocol: str, *account: str) -> subprocess.Popen:
    """irc-framework (Kiwi IRC's IRC library, under Node.js) connecting to SERVER's /socket as kiwi."""
    missing = pytest.fail if os.environ.get("PYCHAT_REQUIRE_BROWSER") else pytest.skip
    if shutil.which("node") is None or not (IRC_FRAMEWORK / "node_modules" / "irc-framework").is_dir():
        missing(f"this test needs Node.js and irc-framework: npm ci --prefix {IRC_FRAMEWORK.relative_to(ROOT)}")
    return subprocess.Popen(["node", str(IRC_FRAMEWORK / "client.js"), str(web_port(server)), subprotocol, *account],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("subprotocol", ["text.ircv3.net", ""])
def test_another_ircv3_websocket_client_talks_through_the_door(start_server, connect, subprotocol):
    server = start_server("--web-port", "0", "--guess-delay", "0")
    kiwi = connect(server, "kiwi")
    kiwi.send("/register a long pass phrase 7")
    kiwi.expect("-- Registered ", timeout=10)
    kiwi.send("/quit")
    kiwi.wait_closed()
    alice = connect(server, "alice")
    client = irc_framework(server, subprotocol, "kiwi", "a long pass phrase 7")
    try:
        alice.expect(re.escape("kiwi: hello from irc-framework"))
        alice.send("bye kiwi")
        output, errors = client.communicate(timeout=TIMEOUT)
    finally:
        client.kill()
    events = [json.loads(line) for line in output.splitlines()]
    kinds = [event["event"] for event in events]
    assert kinds[-1] == "closed" and "timeout" not in kinds, (output, errors)
    registered = next(event for event in events if event["event"] == "registered")
    assert registered["nick"] == "kiwi" and {"sasl", "server-time", "message-tags", "batch"} <= set(
        registered["caps"]), registered
    assert {"event": "loggedin", "account": "kiwi"} in events, output
    said = next(event for event in events if event["event"] == "message" and event["nick"] == "alice")
    assert (said["nick"], said["target"], said["text"]) == ("alice", "#lobby", "bye kiwi")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", said["time"] or ""), said


def test_mentions_and_private_messages_notify_while_the_tab_is_hidden(start_server, irc_connect, browser):
    server = start_server("--web-port", "0", "--irc-port", "0")
    page = Page(browser, server)
    page.sign_in("webby")
    assert page.find("#notify").is_displayed(), "notifications are offered while the browser has not been asked"
    origin = f"http://127.0.0.1:{web_port(server)}"
    browser.execute_cdp_cmd("Browser.grantPermissions", {"permissions": ["notifications"], "origin": origin})
    # What the page shows as notifications, kept where the test can read it (the browser's are not in the DOM).
    browser.execute_script("""
        const Real = window.Notification;
        window.shownNotifications = [];
        window.Notification = class extends Real {
            constructor(title, options) { super(title, options); window.shownNotifications.push([title, options.body]); }
        };""")
    alice = irc_connect(server, "alice")
    page.wait(lambda: "alice" in page.find("#member-list").text, "alice among #lobby's members")

    def titles() -> list[str]:
        """The titles of the browser's tabs, the hidden ones' too (the page's reads only the tab in front)."""
        return [target["title"] for target in browser.execute_cdp_cmd("Target.getTargets", {})["targetInfos"]
                if target["type"] == "page"]

    tab = browser.current_window_handle
    browser.switch_to.new_window("tab")          # pyChat's tab is hidden behind it
    try:
        for line in ("PRIVMSG #lobby :hey webby, look", "PRIVMSG #lobby :nothing for anyone", "PRIVMSG webby :psst"):
            alice.send(line)
        # The private line, the last, is unread in a conversation not shown: the page has read all three.
        page.wait(lambda: "(1) pyChat" in titles(), "the hidden tab's title counting the private line")
    finally:
        browser.close()
        browser.switch_to.window(tab)
    assert browser.execute_script("return window.shownNotifications") == [
        ["alice in #lobby", "hey webby, look"], ["alice (private)", "psst"]]
    alice.send("PRIVMSG #lobby :webby, you are looking")
    page.wait_for_line("webby, you are looking")
    assert len(browser.execute_script("return window.shownNotifications")) == 2, "none while the tab is seen"


def test_the_browser_reconnects_after_a_restart_with_its_rooms_and_draft(start_server, browser):
    port = str(free_port())
    server = start_server("--web-port", port)
    page = Page(browser, server)
    page.sign_in("webby")
    page.type("/join #dev")
    page.wait(lambda: page.current() == "#dev", "#dev joined")
    page.type("not sent yet", enter=False)
    server.stop()
    page.wait(lambda: "reconnecting in" in page.status(), "the reconnection's countdown")
    assert "trouble" in page.find("#status").get_attribute("class")
    page.screenshot("reconnecting")
    start_server("--web-port", port)
    page.wait(lambda: page.status() == "Connected as webby", "connected again", timeout=10)
    page.wait(lambda: "#dev" in page.rooms() and page.current() == "#dev", "#dev joined again")
    page.wait_for_line(r"You joined #dev")
    assert page.find("#input").get_attribute("value") == "not sent yet"


def test_whoever_signs_in_after_a_quit_sees_nothing_of_the_person_before(start_server, connect, browser):
    server = start_server("--web-port", "0")
    alice = connect(server, "alice")
    page = Page(browser, server)
    page.sign_in("webby")
    page.type("/join #webbys-room")
    page.wait(lambda: page.current() == "#webbys-room", "#webbys-room joined")
    alice.send("/msg webby the secret is 42")
    page.wait(lambda: page.rooms().get("alice") == "1", "alice's private message")
    page.type("a draft for the room", enter=False)
    page.find("#rooms button[data-room='#lobby']").click()
    page.wait(lambda: page.current() == "#lobby", "#lobby shown")
    page.type("/quit")
    page.wait(lambda: page.find("#signin").is_displayed(), "the sign-in form")
    page.sign_in("mallory", expect_success=False)
    page.wait(lambda: page.status() == "Connected as mallory", "mallory signed in")
    page.type("/join #mallorys-room")       # answered after any JOIN sent at the sign-in
    page.wait(lambda: page.current() == "#mallorys-room", "#mallorys-room joined")
    assert set(page.rooms()) == {"*server*", "#lobby", "#mallorys-room"}, page.rooms()
    assert not any("secret" in line for line in page.lines()), page.lines()
    stored = browser.execute_script("return Object.keys(sessionStorage).map(k => k + '=' + sessionStorage[k])")
    assert not any("draft" in item for item in stored), stored


def test_someone_else_signing_in_after_a_reload_does_not_rejoin_the_rooms_of_the_person_before(start_server, browser):
    server = start_server("--web-port", "0")
    page = Page(browser, server)
    page.sign_in("webby")
    page.type("/join #webbys-room")
    page.wait(lambda: page.current() == "#webbys-room", "#webbys-room joined")
    page = Page(browser, server)            # the same tab, reloaded: its sessionStorage stays
    page.sign_in("mallory", expect_success=False)
    page.wait(lambda: page.status() == "Connected as mallory", "mallory signed in")
    page.type("/join #mallorys-room")
    page.wait(lambda: page.current() == "#mallorys-room", "#mallorys-room joined")
    assert "#webbys-room" not in page.rooms(), page.rooms()


def test_the_page_says_why_the_server_closed_the_connection(start_server, browser):
    server = start_server("--web-port", "0", "--idle-timeout", "2")
    page = Page(browser, server)
    page.sign_in("webby")
    page.wait(lambda: "Disconnected" in page.status(), "disconnected for saying nothing", timeout=10)
    assert "Nothing said for 2 s" in page.status(), page.status()


def test_the_countdown_stops_once_connected_again_after_an_online_event(start_server, browser):
    # The network goes and the countdown runs; it comes back and the browser's "online" reconnects at once.
    port = str(free_port())
    server = start_server("--web-port", port)
    page = Page(browser, server)
    page.sign_in("webby")
    server.stop()
    page.wait(lambda: "reconnecting in" in page.status(), "the reconnection's countdown")
    page.wait(lambda: browser.execute_script(
        "if (state.socket) return false; window.dispatchEvent(new Event('online')); return true;"),
        "an online event during the countdown")
    start_server("--web-port", port)
    page.wait(lambda: page.status() == "Connected as webby", "connected again", timeout=15)
    time.sleep(1.5)                         # a countdown left running would have ticked since
    assert page.status() == "Connected as webby", page.status()
    assert "trouble" not in page.find("#status").get_attribute("class")


def test_one_long_message_counts_as_one_unread_line(start_server, connect, browser):
    # pyChat takes up to 4096 bytes in a line; IRC carries it in pieces, with the msgids ID, ID-1, ID-2...
    server = start_server("--web-port", "0")
    alice = connect(server, "alice")
    page = Page(browser, server)
    page.sign_in("webby")
    page.type("/join #dev")
    page.wait(lambda: page.current() == "#dev", "#dev shown")
    alice.expect(r"\*\*\* webby joined #lobby")
    alice.send("word " * 700)
    alice.send("and a short one")
    page.wait(lambda: browser.execute_script(
        "return state.buffers.get('#lobby').lines.some(line => line.text === 'and a short one')"),
        "the short line in #lobby")
    pieces = browser.execute_script(
        "return state.buffers.get('#lobby').lines.filter(line => line.text.startsWith('word')).length")
    assert pieces > 1, "the long line came in one piece: the test proves nothing"
    assert page.rooms()["#lobby"] == "2", page.rooms()


def test_a_message_longer_than_an_irc_line_is_sent_in_pieces(start_server, connect, browser):
    # 300 Cyrillic letters are 600 bytes: more than a PRIVMSG's 510, a short paragraph to a pyChat user.
    server = start_server("--web-port", "0")
    alice = connect(server, "alice")
    page = Page(browser, server)
    page.sign_in("webby")
    alice.expect(r"\*\*\* webby joined #lobby")
    page.type("д" * 300)
    pieces = [alice.expect(r"webby: д+$") for _ in range(2)]
    assert sum(piece.count("д") for piece in pieces) == 300, pieces
    page.type("/me " + "waves " * 100)
    actions = [alice.expect(r"\* webby waves") for _ in range(2)]
    assert sum(action.count("waves") for action in actions) == 100, actions
    # Pasted (typed, it would take long): pyChat's own lines go up to 4096 bytes.
    browser.execute_script("document.getElementById('input').value = 'w'.repeat(3000)")
    page.type("")
    said = ""
    while len(said) < 3000:
        said += alice.expect(r"webby: w+$").removeprefix("webby: ")
    assert said == "w" * 3000
    # A paste past a WebSocket message's limit, which would close the socket: too long to send at once, and
    # kept to be cut.
    browser.execute_script("document.getElementById('input').value = 'x'.repeat(9000)")
    page.type("")
    page.wait_for_line(r"That is 9000 bytes: at most 4000 are sent at once")
    assert page.find("#input").get_attribute("value") == "x" * 9000
    assert page.status() == "Connected as webby", page.status()
    assert "longer than" not in server.log(), server.log()[-600:]


def test_a_connection_refused_at_the_door_says_why_in_the_browser(start_server, connect, browser):
    server = start_server("--web-port", "0", "--max-per-ip", "8")     # room for the page's files at once
    page = Page(browser, server)
    page.wait(lambda: browser.execute_script("return document.querySelectorAll('#rooms button').length > 0"),
              "the page loaded")
    for _ in range(9):                      # 127.0.0.1 fills up (a connection Chromium keeps ready counts)
        if "Too many connections" in connect(server).recv_line():
            break
    else:
        pytest.fail("nine connections from one address were let in with --max-per-ip 8")
    page.sign_in("webby", expect_success=False)
    error = page.wait(lambda: page.find("#signin-error").text, "why the sign-in failed")
    assert "Too many connections from your address (at most 8)" in error, error
