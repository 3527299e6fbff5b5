"""/mute and /unmute: stop someone from putting words in front of others."""
from commands import command


@command("mute", "NICK", operator=True)
def mute(ctx, nick):
    """Stop NICK from talking in rooms, and from anything that shows their words to others.

    A muted person still reads, joins and leaves rooms (unannounced), and
    sends private messages. They cannot talk, act, change nickname, set a
    topic, invite, run a room, or have their away status or /quit message
    shown.
    """
    ctx.reply(f"Muted {ctx.set_muted(nick, True)}.")


@command("unmute", "NICK", operator=True)
def unmute(ctx, nick):
    """Let NICK talk in rooms again."""
    ctx.reply(f"Unmuted {ctx.set_muted(nick, False)}.")
