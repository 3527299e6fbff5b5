"""/topic: what the room is about."""
from commands import command


@command("topic", usage="/topic TEXT...", operator=True)
def set_topic(ctx, text):
    """Set the topic of your room; everyone who joins sees it."""
    ctx.set_topic(text)
