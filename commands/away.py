"""/away and /back: let people know you are not at the keyboard."""
from commands import CommandError, command


@command("away", usage="/away [REASON...]")
def away(ctx, reason):
    """Mark yourself away; private messages to you are answered with the reason."""
    ctx.set_away(reason or "away")
    ctx.reply(f"You are marked away ({reason or 'no reason given'}). /back when you return.")


@command("back", usage="/back")
def back(ctx):
    """Mark yourself back after /away."""
    if ctx.away is None:
        raise CommandError("You are not away.")
    ctx.set_away(None)
    ctx.reply("Welcome back.")
