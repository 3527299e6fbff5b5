"""/who: the people in a room."""
from commands import command


@command("who", "[ROOM]", aliases=("names",))
def who(ctx, room):
    """List the people in your current room (or ROOM), who of them is away, and its operators."""
    name, people = ctx.room_members(room)
    described = []
    for person in people:
        details = ["operator"] * person.room_operator + ["away"] * bool(person.away)
        described.append(person.nick + (f" ({', '.join(details)})" if details else ""))
    ctx.reply(f"{len(people)} in #{name}: {', '.join(described)}")
