"""/who: the people in your room."""
from commands import command


@command("who", usage="/who", aliases=("names",))
def who(ctx):
    """List the people in your room, and who of them is away."""
    people = ctx.room_members()
    names = ", ".join(p.nick + " (away)" * bool(p.away) for p in people)
    ctx.reply(f"{len(people)} in #{ctx.room}: {names}")
