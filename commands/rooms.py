"""/rooms: the rooms that have people in them."""
from commands import command


@command("rooms")
def list_rooms(ctx):
    """List the rooms with how many are in each and their topics, marking yours and your current one.

    Private rooms (with a key, or invite-only) are listed only to the people
    in them.
    """
    rooms = ctx.rooms()
    ctx.reply(f"{len(rooms)} room{'s' * (len(rooms) != 1)}:")
    for room in rooms:
        marks = ["current" if room.current else "yours"] * room.yours + ["private"] * room.private
        details = ", ".join([str(room.people), *marks])
        ctx.reply(f"#{room.name} ({details})" + (f": {room.topic}" if room.topic else ""))
