"""/motd: the message of the day."""
from commands import command


@command("motd")
def motd(ctx):
    """Show the server's message of the day again."""
    lines = ctx.motd()
    if not lines:
        ctx.reply("This server has no message of the day.")
    for line in lines:
        ctx.reply(line)
