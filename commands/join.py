"""/join: enter a room, or switch to one you are in."""
from commands import command


@command("join", "ROOM [KEY]")
def join_room(ctx, room, key):
    """Enter ROOM (the # is optional), creating it if no one is there yet; it becomes your current room.

    You stay in your other rooms and see their lines tagged with their name.
    The room is told; you see who is there, the topic and the lines you
    missed. Joining a room you are in only makes it current. A room with a
    key needs it (/join ROOM KEY); an invite-only one needs an /invite.
    Whoever opens a room is its operator (see /mode), and opening it with a
    KEY sets that key, as /mode key KEY would.
    """
    ctx.join(room, key)
