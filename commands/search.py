"""/search: find lines in the history you may read."""
from commands import command


@command("search", "[#ROOM] TEXT...")
def search(ctx, room, text):
    """Find the latest lines that hold every word of TEXT, in every room or in #ROOM.

    It searches the rooms open to everyone and your own private conversations,
    as far back as the server keeps history (/uptime says how it searches).
    """
    found = ctx.search(text, room)
    if not found:
        ctx.reply(f"No line holds {text!r}" + (f" in #{room.lstrip('#')}." if room else "."))
    for line in found:
        said = f"* {line.nick} {line.text}" if line.action else f"<{line.nick}> {line.text}"
        ctx.reply(f"[{line.when}] {line.where} {said}")
