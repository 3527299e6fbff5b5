"""/ignore and /unignore: stop seeing someone, for your connection only."""
from commands import command


@command("ignore", "[NICK]")
def ignore(ctx, nick):
    """Stop seeing NICK's lines and private messages; without NICK, list whom you ignore."""
    if nick is None:
        ignored = ctx.ignored()
        ctx.reply("You ignore: " + ", ".join(ignored) if ignored else "You ignore no one.")
        return
    ctx.reply(f"You now ignore {ctx.ignore(nick)}. /unignore to see them again.")


@command("unignore", "NICK")
def unignore(ctx, nick):
    """See NICK's lines again after /ignore."""
    ctx.reply(f"You see {ctx.ignore(nick, ignoring=False)} again.")
