"""/op: become an operator of the server."""
from commands import command


@command("op", "SECRET...")
def become_operator(ctx, secret):
    """Become an operator of the server with its operator password.

    Server operators may /disconnect, /mute and /unmute anyone, and run every
    room as its operators do (/kick, /topic, /mode, joining private rooms).
    Wrong passwords are logged and each one makes the next answer slower.
    """
    ctx.become_operator(secret)
    ctx.reply("You are now an operator.")
