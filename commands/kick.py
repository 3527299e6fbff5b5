"""/kick: disconnect someone."""
from commands import command


@command("kick", usage="/kick NICK [REASON...]", operator=True)
def kick(ctx, nick, reason):
    """Disconnect NICK; they and their room see who did it and why."""
    ctx.reply(f"Kicked {ctx.kick(nick, reason)}.")
