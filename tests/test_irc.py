"""The IRC port, spoken raw over real sockets: registration, every command and its numerics, the
errors, and rooms shared with pyChat-protocol clients.

Each test starts a real server with --irc-port 0. To prove that something did
NOT arrive, someone sends a later line and the test checks that it comes first.
"""
from __future__ import annotations

import base64
import re
import ssl
import time

import pytest

from conftest import SERVER_SCRIPT, IrcClient, import_script, shown
from test_tls import certificates  # noqa: F401 (a fixture: a throwaway authority and a server certificate)

server = import_script(SERVER_SCRIPT, "pychat_server")
PASSWORD = "open sesame 9"
OP_PASSWORD = "let me run it 4"
IRC_SERVER = ("--irc-port", "0", "--op-password", OP_PASSWORD, "--guess-delay", "0.05")     # irc_server's options


@pytest.fixture
def irc_server(start_server):
    return start_server(*IRC_SERVER)


@pytest.fixture
def shared_irc_server(module_servers):
    """An irc_server that the module's tests which change nothing on it share (see module_servers)."""
    return module_servers(*IRC_SERVER)


def params(line: str) -> list[str]:
    """The parameters of an IRC message line (the parser itself is tested in test_irc_protocol.py)."""
    return server.parse_irc_message(line).params


def numeric_of(line: str) -> str:
    return server.parse_irc_message(line).command


# -- registration ---------------------------------------------------------------------------------------

def test_registration_is_welcomed_with_001_to_005_no_motd_and_the_lobby(irc_server, irc_connect):
    alice = irc_connect(irc_server)
    lines = alice.register("alice")
    numerics = [numeric_of(line) for line in lines]
    for expected in ("001", "002", "003", "004", "005", "422", "JOIN", "353", "366"):
        assert expected in numerics, f"no {expected} in {shown(lines, 40)}"
    assert numerics.index("001") < numerics.index("005") < numerics.index("422") < numerics.index("JOIN")
    assert "Welcome to the pyChat IRC network, alice!~alice@pychat" in lines[numerics.index("001")]
    assert any("/msg pyChat help" in line for line in lines)
    irc_server.wait_for_log(r"alice@127\.0\.0\.1 signed in")


def test_isupport_tells_the_truth_about_names_channels_and_modes(irc_server, irc_connect):
    lines = irc_connect(irc_server).register("alice")
    tokens = {token.split("=")[0]: token.partition("=")[2]
              for line in lines if numeric_of(line) == "005" for token in params(line)[1:-1]}
    assert tokens["CHANTYPES"] == "#"
    assert tokens["NICKLEN"] == "20" and tokens["CHANNELLEN"] == "21"
    assert tokens["PREFIX"] == "(ov)@+"
    assert tokens["CHANMODES"] == "beI,k,l,imnst"
    assert tokens["EXCEPTS"] == "e" and tokens["INVEX"] == "I"
    assert tokens["NETWORK"] == "pyChat"
    assert tokens["CASEMAPPING"] == "ascii"
    assert "UTF8ONLY" in tokens


def test_cap_ls_302_holds_registration_until_cap_end(irc_server, irc_connect):
    alice = irc_connect(irc_server)
    alice.send("CAP LS 302")
    alice.send("NICK alice")
    alice.send("USER alice 0 * :Alice")
    listing = alice.expect(r"CAP \* LS ")
    assert set(params(listing)[-1].split()) >= {"server-time", "multi-prefix", "away-notify", "echo-message"}
    alice.send("CAP REQ :server-time")
    alice.expect(r"CAP alice ACK :?server-time")
    alice.send("PING :still-negotiating")
    assert params(alice.expect("PONG"))[-1] == "still-negotiating", "registration went on before CAP END"
    alice.send("CAP END")
    assert alice.expect("001 alice ").startswith("@time=")


@pytest.mark.parametrize("line, numeric", [
    ("JOIN #dev", "451"), ("PRIVMSG #lobby :hi", "451"), ("NICK", "431"), ("NICK 9lives", "432"),
    ("NICK pyChat", "432"), ("NICK al!ce", "432"), ("USER alice 0 *", "461"), ("CAP FLY", "410"),
])
def test_mistakes_while_registering_get_their_numeric_and_the_connection_stays(shared_irc_server, irc_connect,
                                                                               line, numeric):
    client = irc_connect(shared_irc_server)
    client.send(line)
    answer = client.expect(r"\d\d\d ")
    assert numeric_of(answer) == numeric, answer
    client.register("alice")


def test_a_nickname_taken_or_looking_like_one_gets_433_and_another_may_be_chosen(irc_server, irc_connect, connect):
    connect(irc_server, "alice")
    for n, wanted in enumerate(("alice", "ALICE", "AIice", "аӏісе"), start=2):      # the last all Cyrillic
        client = irc_connect(irc_server)
        client.send(f"NICK {wanted}")
        client.send("USER x 0 * :x")
        assert f" 433 * {wanted} " in client.expect(r"433 "), "a look-alike was let in"
        # Another free name each time: the one before may not have been given up yet.
        client.send(f"NICK alice{n}")
        client.expect(f"001 alice{n} ")
        client.close()


def test_the_server_password_is_given_with_pass(start_server, irc_connect):
    server = start_server("--irc-port", "0", "--password", PASSWORD, "--guess-delay", "0.05")
    right = irc_connect(server)
    right.register("alice", password=PASSWORD)
    wrong = irc_connect(server)
    wrong.send("PASS :guess")
    wrong.send("NICK mallory")
    wrong.send("USER m 0 * :m")
    wrong.expect("464 ", timeout=10)
    assert any(line.startswith("ERROR :") for line in wrong.wait_closed(timeout=10))
    server.wait_for_log("wrong server password")


def test_a_connection_that_never_registers_is_closed_with_an_error(start_server, irc_connect):
    server = start_server("--irc-port", "0", "--nick-timeout", "0.5")
    client = irc_connect(server)
    client.send("NICK alice")
    closing = client.wait_closed(timeout=5)
    assert any(line.startswith("ERROR :Closing link") and "within 0.5 s" in line for line in closing), closing


def test_quit_ends_with_error_and_the_rooms_hear_the_reason(irc_server, irc_connect, connect):
    bob = connect(irc_server, "bob")
    alice = irc_connect(irc_server, "alice")
    bob.expect(re.escape("*** alice joined #lobby"))
    alice.send("QUIT :off to lunch")
    assert any(line.startswith("ERROR :Closing link: alice") for line in alice.wait_closed())
    bob.expect(re.escape("*** alice quit (off to lunch)"))


# -- ping and pong ------------------------------------------------------------------------------------

def test_ping_is_answered_with_pong(irc_server, irc_connect):
    alice = irc_connect(irc_server, "alice")
    alice.send("PING :12345")
    assert params(alice.expect("PONG "))[-1] == "12345"
    alice.send("PING")
    alice.expect("409 ")


def test_a_quiet_client_is_pinged_and_one_that_does_not_answer_is_let_go(start_server, irc_connect, connect):
    server = start_server("--irc-port", "0", "--irc-ping", "1")
    bob = connect(server, "bob")
    alive = irc_connect(server, "alive")
    silent = irc_connect(server, "silent")
    token = params(alive.expect("PING ", timeout=5))[-1]
    alive.send(f"PONG :{token}")
    silent.expect("PING ", timeout=5)
    closing = silent.wait_closed(timeout=5)
    assert any("Ping timeout" in line for line in closing if line.startswith("ERROR")), closing
    bob.expect(r"\*\*\* silent quit \(Ping timeout: \d+ seconds\)", timeout=5)
    alive.send("PING :after")
    alive.expect("PONG .*after")


# -- talking with pyChat users ---------------------------------------------------------------------------

def test_irc_and_pychat_users_talk_in_two_rooms_and_see_each_others_joins(irc_server, irc_connect, connect):
    bob = connect(irc_server, "bob")
    alice = irc_connect(irc_server, "alice")
    bob.expect(re.escape("*** alice joined #lobby"))
    bob.send("/join #dev")
    bob.expect(r"\*\*\* You are in #dev")
    alice.send("JOIN #dev")
    names = alice.expect("353 alice = #dev ")
    assert set(params(names)[-1].split()) == {"@bob", "alice"}
    bob.expect(re.escape("*** alice joined #dev"))
    alice.send("PRIVMSG #dev :hello dev")
    alice.send("PRIVMSG #lobby :hello lobby")
    assert bob.expect("alice: ") == "alice: hello dev"
    assert bob.expect("#lobby alice: ") == "#lobby alice: hello lobby"
    bob.send("hi from dev")
    bob.send("/msg #lobby hi from the lobby")
    assert params(alice.expect(r"PRIVMSG #dev ")) == ["#dev", "hi from dev"]
    assert alice.expect("PRIVMSG #lobby ").startswith(":bob!~user@pychat PRIVMSG #lobby :hi from the lobby")
    alice.send("PART #dev")
    alice.expect("PART #dev")
    bob.expect(re.escape("*** alice left #dev"))


def test_without_echo_message_your_own_lines_do_not_come_back_and_with_it_they_do(irc_server, irc_connect, connect):
    bob = connect(irc_server, "bob")
    plain = irc_connect(irc_server, "plain")
    echoed = irc_connect(irc_server, "echoed", ("echo-message",))
    plain.send("PRIVMSG #lobby :one")
    bob.expect("plain: one")
    echoed.send("PRIVMSG #lobby :two")
    bob.expect("echoed: two")
    bob.send("three")
    assert params(plain.expect("PRIVMSG #lobby "))[-1] == "two", "plain got its own line back"
    assert params(echoed.expect("PRIVMSG #lobby "))[-1] == "one"
    assert echoed.expect("PRIVMSG #lobby ").startswith(":echoed!~echoed@pychat PRIVMSG #lobby :two")
    echoed.send("PRIVMSG bob :private")
    assert echoed.expect("PRIVMSG bob ").endswith(":private")


def test_history_on_join_has_server_time_tags_when_asked_for_and_a_marker_otherwise(irc_server, irc_connect, connect):
    bob = connect(irc_server, "bob")
    bob.send("said before anyone came")
    bob.expect("bob: said before")
    said_at = time.time()
    tagged = irc_connect(irc_server)
    lines = tagged.register("tagged", ("server-time",)) + tagged.lines_until("NOTICE #lobby :End of #lobby history")
    [replayed] = [line for line in lines if "said before anyone came" in line]
    stamp = re.match(r"@time=(\S+) ", replayed).group(1)
    assert abs(time.mktime(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone - said_at) < 3
    assert params(replayed)[-1] == "said before anyone came"
    untagged = irc_connect(irc_server)
    lines = untagged.register("untagged") + untagged.lines_until("NOTICE #lobby :End of #lobby history")
    [replayed] = [line for line in lines if "said before anyone came" in line]
    assert re.search(r":\[history \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\] said before anyone came$", replayed)
    assert any("End of #lobby history" in line for line in lines)


def test_formatting_codes_pass_between_irc_users_and_are_taken_out_for_pychat_users(irc_server, irc_connect, connect):
    bob = connect(irc_server, "bob")
    alice = irc_connect(irc_server, "alice")
    carol = irc_connect(irc_server, "carol")
    alice.send("PRIVMSG #lobby :\x02bold\x02 \x0304,12red\x03 \x1b[2Jescape\x07")
    assert params(carol.expect("PRIVMSG #lobby "))[-1] == "\x02bold\x02 \x0304,12red\x03 [2Jescape"
    assert bob.expect("alice: ") == "alice: bold red [2Jescape"


def test_actions_cross_both_ways(irc_server, irc_connect, connect):
    bob = connect(irc_server, "bob")
    alice = irc_connect(irc_server, "alice")
    alice.send("PRIVMSG #lobby :\x01ACTION waves\x01")
    bob.expect(re.escape("* alice waves"))
    bob.send("/me bows")
    assert params(alice.expect("PRIVMSG #lobby "))[-1] == "\x01ACTION bows\x01"


def test_a_long_pychat_line_reaches_irc_users_in_pieces_that_fit_and_lose_nothing(irc_server, irc_connect, connect):
    bob = connect(irc_server, "bob")
    alice = irc_connect(irc_server, "alice", ("server-time",))
    text = " ".join(f"word{n:04d}" for n in range(400))          # 3,999 bytes
    bob.send(text)
    bob.expect("bob: word0000")
    bob.send("end")
    pieces = []
    while True:
        line = alice.expect("PRIVMSG #lobby ")
        if params(line)[-1] == "end":
            break
        assert len(re.sub(r"^@\S+ ", "", line).encode()) + 2 <= 512, f"{len(line)} bytes"
        pieces.append(params(line)[-1])
    assert len(pieces) >= 8
    assert " ".join(pieces) == text


def test_private_messages_cross_both_ways_and_a_missing_nick_gets_401(irc_server, irc_connect, connect):
    bob = connect(irc_server, "bob")
    alice = irc_connect(irc_server, "alice")
    alice.send("PRIVMSG bob :psst")
    bob.expect(re.escape("[pm from alice] psst"))
    bob.send("/msg alice hush")
    assert alice.expect("PRIVMSG alice ").startswith(":bob!~user@pychat PRIVMSG alice :hush")
    alice.send("PRIVMSG nobody :hello?")
    assert params(alice.expect("401 "))[:2] == ["alice", "nobody"]
    alice.send("NOTICE nobody :no answer to a notice")
    alice.send("PRIVMSG")
    alice.expect("411 ")
    alice.send("PRIVMSG bob")
    alice.expect("412 ")


# -- channels ------------------------------------------------------------------------------------------

def test_join_takes_several_channels_with_keys_and_zero_leaves_them(irc_server, irc_connect, connect):
    bob = connect(irc_server, "bob")
    bob.send("/join #vault")
    bob.expect(r"\*\*\* You are in #vault")
    bob.send("/mode key sesame")
    bob.expect(r"\*\*\* bob set a key on #vault")
    alice = irc_connect(irc_server, "alice")
    alice.send("JOIN #vault,#dev,#ops wrong")
    assert params(alice.expect("475 "))[1] == "#vault"
    alice.expect("JOIN #dev")
    alice.expect("JOIN #ops")
    alice.send("JOIN #vault,#dev sesame")
    alice.expect("JOIN #vault")
    alice.send("JOIN 0")
    for channel in ("#lobby", "#dev", "#ops", "#vault"):
        alice.expect(f"PART {channel}")
    alice.send("JOIN dev")                          # an IRC user may be in no channel: not put back anywhere
    lines = alice.lines_until("403 alice dev ")
    assert not [line for line in lines if " JOIN " in line], f"put back in a channel: {shown(lines)}"


def test_invite_only_rooms_need_an_invitation(irc_server, irc_connect, connect):
    bob = irc_connect(irc_server, "bob")
    bob.send("JOIN #club")
    bob.expect("JOIN #club")
    bob.send("MODE #club +i")
    bob.expect(r"MODE #club \+i")
    alice = irc_connect(irc_server, "alice")
    alice.send("JOIN #club")
    assert params(alice.expect("473 "))[1] == "#club"
    bob.send("INVITE alice #club")
    assert params(bob.expect("341 "))[1:3] == ["alice", "#club"]
    assert re.match(r":bob!~bob@pychat INVITE alice :?#club$", alice.expect("INVITE alice "))
    alice.send("JOIN #club")
    alice.expect("JOIN #club")
    bob.send("INVITE alice #club")
    assert numeric_of(bob.expect(r"443 ")) == "443"


def test_part_of_a_channel_you_are_not_in_gets_442_of_none_403_and_of_your_last_one_leaves_it(irc_server,
                                                                                               irc_connect):
    bob = irc_connect(irc_server, "bob")
    bob.send("JOIN #dev")
    bob.expect("366 bob #dev ")
    alice = irc_connect(irc_server, "alice")
    alice.send("PART #dev")
    assert params(alice.expect("442 "))[1] == "#dev"
    alice.send("PART #nowhere")
    assert params(alice.expect("403 "))[1] == "#nowhere"
    alice.send("PART #lobby")
    alice.expect(r"^:alice!\S+ PART #lobby")
    alice.send("NAMES #lobby")
    lines = alice.lines_until("366 alice ")
    assert not [line for line in lines if " 353 " in line and "alice" in params(line)[-1].split()], shown(lines)


def test_topic_is_told_shown_and_kept_for_operators_when_the_room_says_so(irc_server, irc_connect, connect):
    bob = connect(irc_server, "bob")
    founder = irc_connect(irc_server, "founder")
    founder.send("JOIN #dev")
    founder.expect("366 founder #dev ")
    founder.send("TOPIC #dev")
    founder.expect("331 founder #dev ")
    founder.send("TOPIC #dev :release friday")
    founder.expect("TOPIC #dev :release friday")
    bob.send("/join #dev")
    bob.expect(re.escape("*** Topic of #dev: release friday"))
    other = irc_connect(irc_server, "other")
    other.send("JOIN #dev")
    assert params(other.expect("332 other #dev "))[-1] == "release friday"
    other.send("TOPIC #dev :mine now")
    assert params(other.expect("482 "))[1] == "#dev"
    founder.send("MODE #dev -t")
    other.expect(r"MODE #dev -t")
    other.send("TOPIC #dev :ours now")
    bob.expect(re.escape("*** other set the topic of #dev: ours now"))


def test_names_list_who_and_whois_describe_the_room_and_its_people(irc_server, irc_connect, connect):
    bob = connect(irc_server, "bob")
    bob.send("/away lunch")
    bob.expect("-- ")
    alice = irc_connect(irc_server, "alice")
    alice.send("JOIN #dev")
    alice.expect("366 alice #dev ")
    alice.send("TOPIC #dev :the dev room")
    alice.send("NAMES #lobby")
    assert set(params(alice.expect("353 alice = #lobby "))[-1].split()) == {"alice", "bob"}
    alice.expect("366 alice #lobby ")
    alice.send("LIST")
    alice.expect("321 ")
    listed = {params(line)[1]: params(line)[2:] for line in alice.lines_until(r"(?::\S+ )?323 ")
              if numeric_of(line) == "322"}
    assert listed == {"#dev": ["1", "the dev room"], "#lobby": ["2", ""]}
    alice.send("WHO #lobby")
    who = {params(line)[5]: params(line)[6] for line in alice.lines_until(r"(?::\S+ )?315 ")
           if numeric_of(line) == "352"}
    assert who == {"alice": "H", "bob": "G"}
    alice.send("WHOIS bob")
    whois = {numeric_of(line): params(line) for line in alice.lines_until(r"(?::\S+ )?318 ")}
    assert whois["311"][1:3] == ["bob", "~user"] and whois["311"][-1] == "bob", "no real name: the nickname"
    assert "connected with pyChat" in whois["312"][-1]
    assert whois["319"][-1] == "#lobby"
    assert whois["301"][-1] == "lunch"
    assert "317" in whois
    alice.send("WHOIS alice")
    assert params(alice.expect("319 alice alice "))[-1].split() == ["#lobby", "@#dev"]
    alice.send("WHOIS nobody")
    alice.expect("401 alice nobody ")


def test_away_is_set_and_cleared_and_told_to_those_who_asked(irc_server, irc_connect, connect):
    bob = connect(irc_server, "bob")
    alice = irc_connect(irc_server, "alice")
    watcher = irc_connect(irc_server, "watcher", ("away-notify",))
    alice.send("AWAY :gone fishing")
    alice.expect("306 ")
    bob.expect(re.escape("*** alice is away (gone fishing)"))
    assert watcher.expect("AWAY ").startswith(":alice!~alice@pychat AWAY :gone fishing")
    bob.send("/msg alice are you there?")
    bob.expect(re.escape("-- alice is away: gone fishing"))
    alice.send("AWAY")
    alice.expect("305 ")
    bob.expect(re.escape("*** alice is back"))
    assert re.match(r":alice!~alice@pychat AWAY$", watcher.expect("AWAY"))


def test_nick_changes_are_told_everywhere_and_bad_ones_get_their_numeric(irc_server, irc_connect, connect):
    bob = connect(irc_server, "bob")
    alice = irc_connect(irc_server, "alice")
    alice.send("NICK alicia")
    assert re.match(r":alice!~alice@pychat NICK :?alicia$", alice.expect("NICK "))
    bob.expect(re.escape("*** alice is now known as alicia"))
    alice.send("NICK bob")
    alice.expect("433 alicia bob ")
    alice.send("NICK b0b")
    alice.expect("433 alicia b0b ")
    alice.send("NICK 1st")
    alice.expect("432 alicia 1st ")
    alice.send("PRIVMSG #lobby :still alicia")
    bob.expect("alicia: still alicia")


def test_room_operators_kick_and_others_are_refused_with_482(irc_server, irc_connect, connect):
    bob = connect(irc_server, "bob")
    founder = irc_connect(irc_server, "founder")
    founder.send("JOIN #dev")
    founder.expect("366 founder #dev ")
    bob.send("/join #dev")
    founder.expect("JOIN #dev")
    guest = irc_connect(irc_server, "guest")
    guest.send("JOIN #dev")
    founder.expect(":guest!~guest@pychat JOIN #dev")
    guest.send("KICK #dev bob :no")
    assert params(guest.expect("482 "))[1] == "#dev"
    founder.send("KICK #dev guest :out you go")
    assert params(guest.expect("KICK #dev "))[1:] == ["guest", "out you go"]
    bob.expect(re.escape("*** guest was kicked from #dev by founder: out you go"))
    founder.send("KICK #dev nobody")
    founder.expect("401 founder nobody ")
    founder.send("KICK #dev guest")
    assert params(founder.expect("441 "))[1:3] == ["guest", "#dev"]
    founder.send("KICK #dev")
    founder.expect("461 founder KICK ")


def test_channel_modes_answer_the_queries_clients_send_on_join_and_change_what_pychat_has(
        irc_server, irc_connect, connect):
    founder = irc_connect(irc_server, "founder")
    founder.send("JOIN #dev")
    founder.expect("366 founder #dev ")
    founder.send("MODE #dev")
    assert params(founder.expect("324 founder #dev "))[2] == "+nt"
    for query, end in (("b", "368"), ("e", "349"), ("I", "347")):
        founder.send(f"MODE #dev {query}")
        founder.expect(f"{end} founder #dev ")
    bob = connect(irc_server, "bob")
    bob.send("/join #dev")
    founder.expect("JOIN #dev")
    founder.send("MODE #dev +o bob")
    founder.expect(r"MODE #dev \+o bob")
    bob.expect(re.escape("*** founder made bob an operator of #dev"))
    founder.send("MODE #dev +ik secret")
    founder.expect(r"MODE #dev \+ik \*$")        # one MODE for the two; the key itself is not shown
    founder.send("MODE #dev")
    assert params(founder.expect("324 founder #dev "))[2:] == ["+iknt", "*"]
    founder.send("MODE #dev +z")
    founder.expect("472 founder z ")
    founder.send("MODE founder")
    founder.expect(r"221 founder \+")
    founder.send("MODE founder +x")
    founder.expect("501 ")
    founder.send("MODE bob")
    founder.expect("502 ")
    founder.send("MODE #lobby +i")
    founder.expect("482 founder #lobby ")           # the lobby has no operators: it is everyone's


def test_ison_userhost_lusers_version_time_and_motd_answer(irc_server, irc_connect, connect):
    connect(irc_server, "bob")
    alice = irc_connect(irc_server, "alice")
    alice.send("ISON bob nobody alice")
    assert params(alice.expect("303 "))[-1].split() == ["bob", "alice"]
    alice.send("USERHOST bob")
    assert params(alice.expect("302 "))[-1] == "bob=+~user@pychat"
    alice.send("LUSERS")
    assert "There are 2 users" in alice.expect("251 ")
    alice.expect("255 ")
    alice.send("VERSION")
    assert params(alice.expect("351 "))[1] == f"pyChat-{server.VERSION}"
    alice.send("TIME")
    alice.expect("391 ")
    alice.send("MOTD")
    alice.expect("422 alice ")                      # no --motd


@pytest.mark.parametrize("line, numeric", [
    ("FLY away", "421"), ("JOIN", "461"), ("KICK #lobby", "461"), ("INVITE bob", "461"), ("TOPIC", "461"),
    ("USER a 0 * :again", "462"), ("OPER me wrong", "464"),
])
def test_every_mistake_gets_its_numeric_and_the_connection_carries_on(shared_irc_server, irc_connect, line,
                                                                      numeric):
    alice = irc_connect(shared_irc_server, "alice")
    alice.send(line)
    assert numeric_of(alice.expect(r"\d\d\d ", timeout=10)) == numeric
    alice.send("PING :alive")
    alice.expect("PONG .*alive")


def test_oper_with_the_operator_password_makes_an_irc_operator(irc_server, irc_connect):
    alice = irc_connect(irc_server, "alice")
    alice.send(f"OPER alice :{OP_PASSWORD}")
    alice.expect("381 alice ")
    alice.send("MODE alice")
    alice.expect(r"221 alice \+o")


# -- pyChat's own commands ------------------------------------------------------------------------------

def test_pychats_commands_answer_through_the_service_nickname(irc_server, irc_connect, connect):
    connect(irc_server, "bob")
    alice = irc_connect(irc_server, "alice")
    alice.send("PRIVMSG pyChat :help")
    first = alice.expect("NOTICE alice ")
    assert first.startswith(":pyChat!pyChat@pychat.server NOTICE alice :/")
    alice.send("PRIVMSG pychat :/online")
    assert re.search(r"2 online: alice \(#lobby\), bob \(#lobby\)", alice.expect("NOTICE alice :2 online"))
    alice.send("ONLINE")                        # what irssi sends for /online
    alice.expect("NOTICE alice :2 online")
    alice.send("PRIVMSG pyChat :fly")
    assert "Unknown command /fly" in alice.expect("NOTICE alice :.*fly")
    alice.send("PRIVMSG pyChat :\x01VERSION\x01")
    assert "\x01VERSION pyChat" in alice.expect("NOTICE alice :\x01VERSION")


def test_the_server_shutting_down_says_so_with_error(irc_server, irc_connect):
    alice = irc_connect(irc_server, "alice")
    irc_server.stop()
    assert any(line.startswith("ERROR :") and "shutting down" in line for line in alice.wait_closed())


def test_the_irc_port_speaks_tls_when_the_server_has_a_certificate(start_server, irc_connect, certificates):
    server = start_server("--irc-port", "0", "--tls-cert", str(certificates.cert), "--tls-key", str(certificates.key))
    alice = irc_connect(server, tls=ssl.create_default_context(cafile=str(certificates.ca)))
    alice.register("alice")
    alice.send("PRIVMSG pyChat :online")
    alice.expect("NOTICE alice :1 online")


# -- accounts: SASL PLAIN -------------------------------------------------------------------------------

ACCOUNT_PASSWORD = "a long pass phrase 7"


def sasl(client: IrcClient, nick: str, account: str, password: str, also: tuple[str, ...] = (),
         realname: str | None = None) -> list[str]:
    """Ask for sasl (and the capabilities ALSO), authenticate with PLAIN, and end the negotiation; returns
    what came until 001."""
    start = len(client.seen)
    client.send("CAP LS 302")
    client.send(f"NICK {nick}")
    client.send(f"USER {nick} 0 * :{realname or nick}")
    assert "sasl=PLAIN" in params(client.expect(r"CAP \* LS "))[-1].split()
    client.send(f"CAP REQ :{' '.join(('sasl', *also))}")
    client.expect(r"CAP \S+ ACK :?sasl")
    client.send("AUTHENTICATE PLAIN")
    client.expect(r"AUTHENTICATE \+")
    client.send("AUTHENTICATE " + base64.b64encode(f"\0{account}\0{password}".encode()).decode())
    client.expect(r"(903|904) ", timeout=10)
    client.send("CAP END")
    return client.seen[start:]


@pytest.fixture
def account_server(start_server, connect, tmp_path):
    """A server with a data directory, where alice registered her nickname from pyChat's client."""
    server = start_server("--irc-port", "0", "--data-dir", str(tmp_path / "data"), "--guess-delay", "0.05")
    alice = connect(server, "alice")
    alice.send(f"/register {ACCOUNT_PASSWORD}")
    alice.expect(r"-- Registered ", timeout=10)
    alice.send("/quit")
    alice.wait_closed()
    server.wait_for_log(r"alice@127\.0\.0\.1 left")
    return server


def test_sasl_plain_signs_in_to_an_account_whatever_nick_was_asked_for(account_server, irc_connect, connect):
    bob = connect(account_server, "bob")
    client = irc_connect(account_server)
    lines = sasl(client, "somebody", "alice", ACCOUNT_PASSWORD)
    assert any(numeric_of(line) == "900" and params(line)[1:3] == ["alice!~user@pychat", "alice"] for line in lines), \
        lines
    assert numeric_of(lines[-1]) == "903"
    client.expect("001 alice ")
    bob.expect(re.escape("*** alice joined #lobby"))
    bob.send("/whois alice")
    assert "alice" in bob.expect(r"-- .*alice")
    client.nick = "alice"
    client.send("WHOIS alice")
    assert params(client.expect("330 alice alice "))[2] == "alice"


def test_a_wrong_sasl_password_gets_904_and_a_registered_name_is_not_given_without_it(
        account_server, irc_connect):
    client = irc_connect(account_server)
    lines = sasl(client, "alice", "alice", "not the password")
    assert numeric_of(lines[-1]) == "904"
    text = params(client.expect("433 \\* alice "))[-1]
    assert "registered" in text and "SASL" in text
    client.send("NICK alice2")
    client.expect("001 alice2 ")
    account_server.wait_for_log("wrong password for alice")


def test_a_look_alike_of_a_registered_name_is_refused_too(account_server, irc_connect):
    client = irc_connect(account_server)
    client.send("NICK ALICE")
    client.send("USER x 0 * :x")
    assert "registered" in client.expect("433 ")
