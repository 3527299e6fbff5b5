"""/online: everyone connected, wherever they are."""
from commands import command


@command("online", usage="/online")
def online(ctx):
    """Show who is online, with their room and whether they are away."""
    people = ctx.online()
    described = []
    for person in people:
        details = [f"#{person.room}"] + ["away"] * bool(person.away) + ["operator"] * person.operator
        described.append(f"{person.nick} ({', '.join(details)})")
    ctx.reply(f"{len(people)} online: {', '.join(described)}")
