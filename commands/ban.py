"""/ban, /unban and /bans: keeping people out of the server."""
from commands import command, duration_and_reason


@command("ban", "TARGET [DURATION] [REASON...]", operator=True)
def ban(ctx, target, duration, reason):
    """Keep TARGET out: a nickname, an address (203.0.113.7) or a network (203.0.113.0/24, 2001:db8::/48).

    A registered nickname bans the account; a guest's nickname bans their
    address. DURATION is a number with s, m, h, d or w (10m, 2h, 7d, 1h30m),
    or "permanent", which is also what no duration means. Anyone online who
    is banned is disconnected with the reason.
    """
    ctx.reply(ctx.ban(target, *duration_and_reason(duration, reason)))


@command("unban", "TARGET", operator=True)
def unban(ctx, target):
    """Lift the ban on TARGET, written as /bans shows it."""
    ctx.reply(ctx.unban(target))


@command("bans", operator=True)
def bans(ctx):
    """List the bans in force, with the time each has left."""
    found = ctx.bans()
    if not found:
        ctx.reply("No bans.")
    for line in found:
        ctx.reply(line)
