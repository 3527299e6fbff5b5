"""/disconnect: close someone's connection to the server."""
from commands import command


@command("disconnect", "NICK [REASON...]", aliases=("kill",), operator=True)
def disconnect(ctx, nick, reason):
    """Disconnect NICK from the server; they and their rooms see who did it and why."""
    ctx.reply(f"Disconnected {ctx.disconnect(nick, reason)}.")
