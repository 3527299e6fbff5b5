"""/op: become an operator."""
from commands import command


@command("op", usage="/op SECRET...")
def become_operator(ctx, secret):
    """Become an operator with the server's operator password.

    Operators may /kick, /mute, /unmute and set the /topic. Wrong passwords
    are logged and each one makes the next answer slower.
    """
    ctx.become_operator(secret)
    ctx.reply("You are now an operator.")
