"""/mute and /unmute: stop someone from talking in rooms."""
from commands import command


@command("mute", usage="/mute NICK", operator=True)
def mute(ctx, nick):
    """Stop NICK from talking in rooms; private messages still work."""
    ctx.reply(f"Muted {ctx.set_muted(nick, True)}.")


@command("unmute", usage="/unmute NICK", operator=True)
def unmute(ctx, nick):
    """Let NICK talk in rooms again."""
    ctx.reply(f"Unmuted {ctx.set_muted(nick, False)}.")
