"""/mute, /unmute and /mutes: stop someone from putting words in front of others, for as long as it takes."""
from commands import command, duration_and_reason


@command("mute", "NICK [DURATION] [REASON...]", operator=True)
def mute(ctx, nick, duration, reason):
    """Stop NICK from talking in rooms, and from anything that shows their words to others.

    A registered nickname mutes the account, wherever it signs in from; a
    guest's nickname mutes the address they connect from. The mute lasts
    across reconnecting and restarts, at both doors, until DURATION is up
    (30s, 10m, 2h, 7d, 1h30m; "permanent", or none, until /unmute).
    A muted person still reads, joins and leaves rooms (unannounced), and
    sends private messages. They cannot talk, act, change nickname, set a
    topic, invite, run a room, or have their away status or /quit message
    shown.
    """
    ctx.reply(ctx.mute(nick, *duration_and_reason(duration, reason)))


@command("unmute", "TARGET", operator=True)
def unmute(ctx, target):
    """Let TARGET talk in rooms again: an account, or a guest's nickname or address as /mutes shows it."""
    ctx.reply(ctx.unmute(target))


@command("mutes", operator=True)
def mutes(ctx):
    """List the mutes in force, with the time each has left."""
    found = ctx.mutes()
    if not found:
        ctx.reply("No one is muted.")
    for line in found:
        ctx.reply(line)
