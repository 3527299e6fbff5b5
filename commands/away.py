"""/away and /back: let people know you are not at the keyboard."""
from commands import command


@command("away", "[REASON...]")
def away(ctx, reason):
    """Mark yourself away; the people in your rooms are told, and private messages are answered with the reason."""
    ctx.set_away(reason or "away")
    ctx.reply(f"You are marked away ({reason or 'no reason given'}). /back when you return.")


@command("back")
def back(ctx):
    """Mark yourself back after /away; the people in your rooms are told."""
    ctx.set_away(None)
    ctx.reply("Welcome back.")
