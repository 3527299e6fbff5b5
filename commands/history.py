"""/history: page back through what was said in a room or a private conversation."""
from commands import CommandError, command


@command("history", "[WHERE] [N]")
def history(ctx, where, count):
    """Show the N lines (50 unless told, at most 500) said before the oldest one you have been shown.

    WHERE is a room (#dev) or the nickname of someone you talked with in
    private; without it, your current room. Ask again to go further back.
    """
    if where is not None and where.isdigit() and count is None:
        where, count = None, where
    if count is not None and not count.isdigit():
        raise CommandError(f"N is a number of lines, not {count!r}.")
    shown = ctx.history(where, int(count) if count else None)
    if not shown:
        ctx.reply("Nothing earlier is kept" + (f" for {where}." if where else "."))
