"""The web client's history, in a real headless Chromium against a real server: the latest lines of a room
asked for with draft/chathistory when it is joined, the divider "new since you left" at the account's read
position (draft/read-marker), older lines loaded as the person scrolls up, read markers sent to the server and
taken from the account's other sessions, and nothing shown twice.

Every wait has a deadline (Page.wait, LineClient.expect) and fails saying what the page showed.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from conftest import ROOT, SERVER_SCRIPT, TIMEOUT, import_script
from test_accounts import sign_in
from test_irc import sasl
from test_web import PHONE, WIDE, Page, browser  # noqa: F401  (browser: the module's headless Chromium)

PASSWORD = "a long pass phrase 7"
DIVIDER = "New since you left"
# Where the README's screenshots go when PYCHAT_DOC_SCREENSHOTS is set (tests/make_screenshots.sh sets it).
DOC_SCREENSHOTS = Path(os.environ.get("PYCHAT_DOC_SCREENSHOTS", ROOT / "tests" / "artifacts" / "web-history"))


def register(server, connect, nick: str) -> None:
    """Register the account NICK from pyChat's port, and leave."""
    client = connect(server, nick)
    client.send(f"/register {PASSWORD}")
    client.expect(r"-- Registered ", timeout=10)
    client.send("/quit")
    client.wait_closed()
    server.wait_for_log(rf"{nick}@\S+ left")


def next_millisecond() -> None:
    """Wait (at most a millisecond) until the clock's millisecond changes: read positions are given to the
    millisecond, so two lines said within one are read or unread together."""
    now = time.time_ns() // 1_000_000
    while time.time_ns() // 1_000_000 == now:
        pass


def open_room(page: Page, name: str) -> None:
    """Click NAME in the room list (again, if the list was drawn anew meanwhile) and wait until it is shown."""
    def click() -> bool:
        page.find(f"#rooms button[data-room='{name}']").click()
        return True
    page.wait(click, f"{name} in the room list")
    page.wait(lambda: page.current() == name, f"{name} shown")


def texts(page: Page) -> list[str]:
    """The page's lines without their times."""
    return page.driver.execute_script(
        "return [...document.querySelectorAll('#log li')].map(li => (li.querySelector('.body') || li).textContent)")


def read_position(page: Page, room: str) -> str | None:
    """The read position the server last told the page for ROOM (an ISO time), None for none."""
    return page.driver.execute_script(
        "const b = state.buffers.get(arguments[0]); return b && b.readAt ? b.readAt.toISOString() : null;", room)


def newest_line_time(page: Page, room: str) -> str | None:
    return page.driver.execute_script(
        "const b = state.buffers.get(arguments[0]); const lines = b.lines.filter(l => l.msgid);"
        "return lines.length ? lines[lines.length - 1].time.toISOString() : null;", room)


def wait_read(page: Page, room: str) -> None:
    """Wait until the server has told the page that ROOM is read up to its newest line."""
    page.wait(lambda: read_position(page, room) is not None and read_position(page, room) == newest_line_time(page, room),
              f"{room} marked read up to its newest line")


def once_each(lines: list[str]) -> None:
    said = [line for line in lines if re.match(r"\S+: ", line)]
    assert len(said) == len(set(said)), f"a line shown twice: {said}"


def test_lines_said_while_away_show_after_a_divider_and_nothing_twice(start_server, connect, browser):  # noqa: F811
    server = start_server("--web-port", "0", "--rate", "0", "--guess-delay", "0")
    register(server, connect, "webby")
    register(server, connect, "bob")
    alice = connect(server, "alice")
    page = Page(browser, server)
    page.sign_in("webby", PASSWORD)
    alice.send("before 1")
    alice.send("before 2")
    page.wait_for_line(r"alice: before 2")
    page.type("/join #dev")
    page.wait(lambda: page.current() == "#dev", "#dev joined and shown")
    alice.send("/join #dev")
    alice.send("dev before")
    page.wait_for_line(r"alice: dev before")
    wait_read(page, "#dev")
    open_room(page, "#lobby")
    wait_read(page, "#lobby")
    assert DIVIDER not in texts(page)

    page.type("/quit")
    page.wait(lambda: page.find("#signin").is_displayed(), "the sign-in form after /quit")
    server.wait_for_log(r"webby@\S+ left")
    alice.send("dev away 1")                # alice is in #dev
    alice.send("dev away 2")
    alice.send("/join #lobby")
    for n in (1, 2, 3):
        alice.send(f"while away {n}")
    alice.expect(r"alice: while away 3")
    bob = connect(server)
    sign_in(bob, "bob", PASSWORD)
    bob.send("/msg webby are you there?")
    bob.expect(r"-- webby is offline")
    next_millisecond()
    bob.send("/msg webby hello?")
    bob.expect(r"-- webby is offline")

    page.sign_in("webby", PASSWORD)         # the same page, which /quit emptied: the lines come from history
    page.wait_for_line(r"alice: while away 3")
    lines = texts(page)
    once_each(lines)
    assert lines.count(DIVIDER) == 1, lines
    divider = lines.index(DIVIDER)
    for text in ("before 1", "before 2"):
        assert f"alice: {text}" in lines[:divider], lines
    assert [line for line in lines[divider:] if line.startswith("alice: ")] == [
        "alice: while away 1", "alice: while away 2", "alice: while away 3"], lines
    page.wait(lambda: page.rooms().get("#dev") == "2", "two unread lines in #dev, those after its divider")
    page.screenshot("history-divider")

    # A private conversation named by CHATHISTORY TARGETS: its lines, once, those after the read position unread
    # (the server puts a new conversation's read position just before its first line: both are new).
    page.wait(lambda: page.rooms().get("bob") == "2", "two unread lines from bob")
    open_room(page, "#dev")
    page.wait_for_line(r"alice: dev away 2")
    lines = texts(page)
    once_each(lines)
    assert [line for line in lines if line == DIVIDER or line.startswith("alice: ")] == [
        "alice: dev before", DIVIDER, "alice: dev away 1", "alice: dev away 2"], lines
    assert page.rooms()["#dev"] == ""
    open_room(page, "bob")
    page.wait_for_line(r"bob: hello\?")
    assert [line for line in texts(page) if line.startswith("bob: ") or line == DIVIDER] == [
        DIVIDER, "bob: are you there?", "bob: hello?"], texts(page)

    # A fresh page (nothing kept in it) shows the same, all from history.
    fresh = Page(browser, server)
    browser.execute_script("sessionStorage.clear()")
    fresh.sign_in("webby", PASSWORD)
    fresh.wait_for_line(r"alice: while away 3")
    lines = texts(fresh)
    once_each(lines)
    said = [line for line in lines if line.startswith("alice: ")]
    assert said == ["alice: before 1", "alice: before 2", "alice: while away 1", "alice: while away 2",
                    "alice: while away 3"], lines
    assert not [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def test_older_lines_load_as_the_person_scrolls_up(start_server, connect, browser):  # noqa: F811
    server = start_server("--web-port", "0", "--rate", "0")
    alice = connect(server, "alice")
    for n in range(1, 121):
        alice.send(f"old {n}")
    alice.expect(r"alice: old 120$")
    page = Page(browser, server)
    page.sign_in("webby")
    page.wait_for_line(r"alice: old 120$")
    said = lambda: [line for line in texts(page) if line.startswith("alice: old ")]  # noqa: E731
    page.wait(lambda: len(said()) == 50, "the latest 50 lines")
    assert said() == [f"alice: old {n}" for n in range(71, 121)]
    wait_read(page, "#lobby")               # a guest's read position too, while they are here
    position = "return [...document.querySelectorAll('#log li')].find(li => li.textContent.endsWith(arguments[0]))" \
               ".getBoundingClientRect().top"

    browser.execute_script("document.getElementById('log').scrollTop = 0")
    page.wait(lambda: len(said()) == 100, "50 older lines after scrolling to the top")
    assert said() == [f"alice: old {n}" for n in range(21, 121)]
    top = browser.execute_script("return document.getElementById('log').getBoundingClientRect().top")
    # The line that was at the top stays where it was: the older lines went above it, out of view.
    assert abs(browser.execute_script(position, "alice: old 71") - top) < 40
    assert browser.execute_script("return document.getElementById('log').scrollTop") > 0

    browser.execute_script("document.getElementById('log').scrollTop = 0")
    page.wait(lambda: len(said()) == 120, "the first 20 lines after scrolling to the top again")
    assert said() == [f"alice: old {n}" for n in range(1, 121)]
    assert browser.execute_script("return state.buffers.get('#lobby').historyDone") is True
    # At the beginning: scrolling up asks for nothing more, and what comes later is shown once.
    browser.execute_script("document.getElementById('log').scrollTop = 0")
    alice.send("new 1")
    page.wait_for_line(r"alice: new 1")
    once_each(texts(page))
    assert len(said()) == 120
    # Scrolled up, the new line is not read: the read position moves only once the end is in view.
    page.wait(lambda: browser.execute_script("return HISTORY.waiting") is False, "the client's look at the view")
    assert browser.execute_script("return state.buffers.get('#lobby').marked.toISOString()") < \
        newest_line_time(page, "#lobby")
    browser.execute_script("const log = document.getElementById('log'); log.scrollTop = log.scrollHeight")
    wait_read(page, "#lobby")
    assert not [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def test_lines_of_other_days_come_under_their_day(start_server, connect, browser, tmp_path):  # noqa: F811
    server_module = import_script(SERVER_SCRIPT, "pychat_server")
    data = tmp_path / "data"
    storage = server_module.Storage(str(data))
    # The browser shows days as its clock does: the lines of a day before and of three days before.
    for days_ago, words in ((3, "long ago"), (1, "yesterday")):
        when = time.time() - days_ago * 86400
        storage.add_messages(server_module.StoredMessage(server_module.Storage.message_id_at(when) + n, when + n,
                                                         "#lobby", "alice", None, "line", f"{words} {n}")
                             for n in range(2))
    storage.close()
    server = start_server("--web-port", "0", "--data-dir", str(data))
    alice = connect(server, "alice")
    alice.send("today 1")
    page = Page(browser, server)
    page.sign_in("webby")
    page.wait_for_line(r"alice: today 1$")
    page.wait_for_line(r"alice: long ago 0$")
    headings = browser.execute_script(
        "return [...document.querySelectorAll('#log li[data-day]')].map(li => [li.dataset.day, li.innerText])")
    days = [day for day, _ in headings]
    assert days[1:] == ["Yesterday", "Today"], headings
    assert "long ago 0" in headings[0][1] and "yesterday 0" in headings[1][1], headings
    three_days_ago = browser.execute_script(
        "return new Date(Date.now() - 3 * 86400000).toLocaleDateString([], "
        "{weekday: 'long', year: 'numeric', month: 'long', day: 'numeric'})")
    assert days[0] == three_days_ago
    alice.send("today 2")                   # a new line of today, under today's heading already
    page.wait_for_line(r"alice: today 2$")
    assert browser.execute_script("return document.querySelectorAll('#log li[data-day]').length") == 3
    page.screenshot("days")


def test_a_read_marker_goes_from_the_browser_to_the_accounts_other_sessions_and_back(start_server, connect,
                                                                                      irc_connect, browser):  # noqa: F811
    server = start_server("--web-port", "0", "--irc-port", "0", "--rate", "0", "--guess-delay", "0")
    register(server, connect, "webby")
    phone = irc_connect(server)
    lines = sasl(phone, "webby", "webby", PASSWORD, ("server-time", "message-tags", "draft/read-marker",
                                                     "draft/chathistory", "batch"))
    assert any(" 903 " in line for line in lines), lines
    phone.expect(r"366 webby #lobby ")
    alice = connect(server, "alice")
    page = Page(browser, server)
    page.sign_in("webby", PASSWORD)
    alice.send("read me, webby")
    said = phone.expect(r"PRIVMSG #lobby :read me, webby")
    stamp = re.search(r"[@;]time=([^; ]+)", said).group(1)
    page.wait_for_line(r"alice: read me, webby")
    # The browser shows the line, its end in view: the phone is told it is read, up to that very line.
    phone.expect(rf"MARKREAD #lobby timestamp={re.escape(stamp)}$", timeout=TIMEOUT)

    # Lines in a room not shown count as unread, until another session reads them.
    page.type("/join #dev")
    page.wait(lambda: page.current() == "#dev", "#dev shown")
    phone.expect(r"366 webby #dev ")
    open_room(page, "#lobby")
    alice.send("/join #dev")
    alice.send("in #dev 1")
    alice.send("in #dev 2")
    said = phone.expect(r"PRIVMSG #dev :in #dev 2")
    page.wait(lambda: page.rooms().get("#dev") == "2", "two unread lines in #dev")
    stamp = re.search(r"[@;]time=([^; ]+)", said).group(1)
    phone.send(f"MARKREAD #dev timestamp={stamp}")
    page.wait(lambda: page.rooms().get("#dev") == "", "#dev read on the phone, so not unread in the browser")
    # The browser marks #lobby once more only for a newer line, and the phone sees no other marker meanwhile.
    alice.send("/join #lobby")
    alice.send("a last line")
    said = phone.expect(r"PRIVMSG #lobby :a last line")
    stamp = re.search(r"[@;]time=([^; ]+)", said).group(1)
    between = phone.lines_until(rf"MARKREAD #lobby timestamp={re.escape(stamp)}$")
    assert not [line for line in between[:-1] if "MARKREAD" in line], between


def test_screenshots_of_the_main_views(start_server, connect, irc_connect, browser):  # noqa: F811
    """The README's pictures: the sign-in form, a room with the divider, the phone's drawer, the dark theme.
    Written to tests/artifacts/web-history, or where PYCHAT_DOC_SCREENSHOTS says (docs/screenshots for the
    README: PYCHAT_DOC_SCREENSHOTS=docs/screenshots python3 -m pytest tests/test_web_history.py -k screenshots)."""
    DOC_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    server = start_server("--web-port", "0", "--irc-port", "0", "--rate", "0", "--guess-delay", "0")
    register(server, connect, "sam")
    register(server, connect, "bob")
    alice = connect(server, "alice")
    bob = connect(server)
    sign_in(bob, "bob", PASSWORD)
    carol = irc_connect(server, "carol")
    alice.send("/join #dev")
    alice.send("/topic Release week: 3.0 is out; bugs go to the tracker, please")
    bob.send("/join #dev")
    carol.send("JOIN #dev")
    page = Page(browser, server)
    page.wait(lambda: page.find("#signin").is_displayed(), "the sign-in form")
    page.find("#nick").send_keys("sam")
    middle = browser.execute_script("const r = document.getElementById('signin').getBoundingClientRect();"
                                    "return [(r.left + r.right) / 2, document.documentElement.clientWidth / 2]")
    assert abs(middle[0] - middle[1]) < 20, f"the sign-in form is not in the middle: {middle}"
    browser.save_screenshot(str(DOC_SCREENSHOTS / "signin.png"))
    page.find("#nick").clear()
    page.sign_in("sam", PASSWORD)
    page.type("/join #dev")
    page.wait(lambda: page.current() == "#dev", "#dev shown")
    for who, text in ((alice, "morning all"), (bob, "hi alice, did the release go out?"),
                      (alice, "yes, 3.0 is on the site: https://example.org/pychat"), (bob, "/me cheers")):
        who.send(text)                      # one after the other, in this order
        page.wait_for_line(re.escape(text.replace("/me", "* bob")))
    wait_read(page, "#dev")
    page.type("/quit")
    page.wait(lambda: page.find("#signin").is_displayed(), "the sign-in form after /quit")
    server.wait_for_log(r"sam@\S+ left")
    for who, text in ((alice, "sam, could you look at the bug with long nicknames?"), (bob, "it is issue 42"),
                      (alice, "no rush, tomorrow is fine")):
        who.send(text)
        alice.expect(rf"\S+: {re.escape(text)}")
    carol.send("PRIVMSG #lobby :anyone up for lunch?")
    bob.send("/msg sam the logs you asked for are in the usual place")
    bob.expect(r"-- sam is offline")
    next_millisecond()
    bob.send("/msg sam ping me when you are back")
    bob.expect(r"-- sam is offline")
    page.sign_in("sam", PASSWORD, expect_success=False)
    page.wait(lambda: page.status() == "Connected as sam", "sam signed in again")
    page.wait(lambda: "#dev" in page.rooms(), "#dev, kept for sam, joined again")
    page.find("#rooms button[data-room='#dev']").click()    # /quit forgot which room was shown
    page.wait(lambda: page.current() == "#dev", "#dev shown again")
    page.wait_for_line(r"alice: no rush")
    page.wait(lambda: page.rooms().get("bob") == "2", "bob's unread lines")
    page.type("thanks, I will look at it", enter=False)
    divider = page.wait(lambda: next((li for li in page.all("#log li.divider")), None), "the divider")
    assert divider.is_displayed() and divider.text == DIVIDER
    browser.save_screenshot(str(DOC_SCREENSHOTS / "room-divider.png"))

    browser.set_window_size(*PHONE)
    try:
        page.find("#menu").click()
        page.wait(lambda: browser.execute_script(
            "return document.getElementById('sidebar').getBoundingClientRect().right") > 200, "the drawer open")
        page.wait(lambda: browser.execute_script(
            "const s = document.getElementById('sidebar'); return getComputedStyle(s).transform === 'none'"),
            "the drawer at rest")
        browser.save_screenshot(str(DOC_SCREENSHOTS / "phone-drawer.png"))
        page.find("#menu").send_keys("\ue00c")          # Escape closes the drawer
    finally:
        browser.set_window_size(*WIDE)
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia",
                            {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    try:
        page.wait(lambda: browser.execute_script(
            "return getComputedStyle(document.body).backgroundColor") == "rgb(18, 20, 23)", "the dark theme")
        browser.save_screenshot(str(DOC_SCREENSHOTS / "dark.png"))
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    for name in ("signin", "room-divider", "phone-drawer", "dark"):
        data = (DOC_SCREENSHOTS / f"{name}.png").read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, name


def test_lines_said_while_kicked_are_shown_after_rejoining(start_server, irc_connect, browser):  # noqa: F811
    server = start_server("--web-port", "0", "--irc-port", "0")
    alice = irc_connect(server, "alice")
    alice.send("JOIN #dev")                 # the first in the room: its operator
    alice.expect(r"366 alice #dev ")
    page = Page(browser, server)
    page.sign_in("webby")
    page.type("/join #dev")
    page.wait(lambda: page.current() == "#dev", "#dev shown")
    alice.expect(r"JOIN #dev")
    alice.send("PRIVMSG #dev :before the kick")
    page.wait_for_line(r"alice: before the kick")
    alice.send("KICK #dev webby :out for a minute")
    page.wait_for_line(r"You were kicked by alice")
    alice.send("PRIVMSG #dev :said while webby was out")
    alice.send("PING :kept")                # answered once the line before it is in the room's history
    alice.expect(r"PONG \S+ :?kept")
    page.type("/join #dev")
    page.wait_for_line(r"You joined #dev")
    page.wait_for_line(r"alice: said while webby was out")
    assert sum("before the kick" in line for line in texts(page)) == 1, texts(page)


def test_one_long_message_said_while_away_counts_as_one_unread_line(start_server, connect, browser):  # noqa: F811
    # pyChat takes up to 4096 bytes in a line; history gives it in pieces, with the msgids ID, ID-1, ID-2...
    server = start_server("--web-port", "0", "--rate", "0", "--guess-delay", "0")
    register(server, connect, "webby")
    alice = connect(server, "alice")
    page = Page(browser, server)
    page.sign_in("webby", PASSWORD)
    page.type("/join #dev")
    page.wait(lambda: page.current() == "#dev", "#dev joined and shown")
    for room in ("#dev", "#lobby"):
        open_room(page, room)
        alice.send(f"/join {room}")
        alice.send(f"{room} before")
        page.wait_for_line(rf"alice: {room} before")
        wait_read(page, room)
    page.type("/quit")
    page.wait(lambda: page.find("#signin").is_displayed(), "the sign-in form after /quit")
    server.wait_for_log(r"webby@\S+ left")
    for room in ("#dev", "#lobby"):         # the same in both: whichever is not shown counts them
        alice.send(f"/join {room}")
        alice.send("word " * 700)
        alice.send(f"short in {room}")
        alice.expect(rf"alice: short in {room}")
    page.sign_in("webby", PASSWORD, expect_success=False)
    page.wait(lambda: page.status() == "Connected as webby", "webby signed in again")
    counts = page.wait(lambda: [count for room, count in page.rooms().items()
                                if room in ("#dev", "#lobby") and room != page.current() and count],
                       "unread lines in the room not shown")
    assert counts == ["2"], (page.current(), page.rooms())
