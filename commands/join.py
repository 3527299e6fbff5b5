"""/join: move to another room."""
from commands import command


@command("join", usage="/join ROOM")
def join_room(ctx, room):
    """Move to ROOM (the # is optional), creating it if no one is there yet.

    Room names follow the nickname rules. The room you leave and the one you
    enter are both told; you see who is there, the topic and recent lines.
    """
    ctx.join(room)
