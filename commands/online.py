"""/online: everyone connected, wherever they are."""
from commands import command


@command("online")
def online(ctx):
    """Show who is online, with their current room and whether they are away.

    A private room is shown only to the people in it.
    """
    people = ctx.online()
    described = []
    for person in people:
        details = [f"#{person.room}"] * bool(person.room) + ["away"] * bool(person.away) \
            + ["operator"] * person.operator
        described.append(f"{person.nick} ({', '.join(details)})" if details else person.nick)
    ctx.reply(f"{len(people)} online: {', '.join(described)}")
