"""/whois: what the server knows about someone online."""
from commands import command


@command("whois", "NICK")
def whois(ctx, nick):
    """Show who NICK is: account or guest, since when, idle for, how connected, rooms, away, operator.

    Idle is the time since they last said anything (in a room or privately).
    Operators of the server also see the address they connect from.
    """
    person = ctx.whois(nick)
    ctx.reply(f"{person.nick}: " + (f"account {person.account}" if person.account else "guest")
              + (", operator of the server" if person.operator else ""))
    ctx.reply(f"{person.nick}: signed in {person.since}, idle {person.idle}")
    ctx.reply(f"{person.nick}: connected with {person.connected}"
              + ("; /sessions lists yours" if person.nick == ctx.nick and "sessions" in person.connected else ""))
    ctx.reply(f"{person.nick}: in " + (", ".join(f"#{room}" for room in person.rooms) or "no room you can see"))
    if person.away:
        ctx.reply(f"{person.nick}: away: {person.away}")
    if person.address:
        ctx.reply(f"{person.nick}: connects from {person.address}")
