"""/me: an action line."""
from commands import command


@command("me", "TEXT...")
def action(ctx, text):
    """Describe what you are doing: /me waves shows '* you waves' to the room."""
    ctx.act(text)
