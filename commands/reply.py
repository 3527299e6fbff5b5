"""/reply: answer the last private message."""
from commands import command


@command("reply", "TEXT...", aliases=("r",))
def reply_private(ctx, text):
    """Answer the last person who sent you a private message."""
    ctx.send_private(ctx.last_private_sender(), text)
