"""/leave: leave a room."""
from commands import command


@command("leave", "[ROOM]", aliases=("part",))
def leave_room(ctx, room):
    """Leave ROOM, or your current room; leaving your last room takes you back to #lobby.

    Your current room becomes the last one you joined of those you are still
    in. #lobby cannot be left when it is your only room: /quit leaves the chat.
    """
    ctx.leave(room)
