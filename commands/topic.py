"""/topic: what a room is about."""
from commands import command


@command("topic", "[#ROOM] [TEXT...]")
def topic(ctx, room, text):
    """Set the topic of your current room (or #ROOM); without TEXT, show it.

    Only the room's operators may set it, unless they let everyone
    (/mode topic everyone). Everyone who joins sees it.
    """
    if text is None:
        settings = ctx.room_settings(room)
        ctx.reply(f"Topic of #{settings.name}: {settings.topic}" if settings.topic
                  else f"#{settings.name} has no topic.")
        return
    ctx.set_topic(text, room)
