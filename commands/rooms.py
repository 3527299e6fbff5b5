"""/rooms: the rooms that have people in them."""
from commands import command


@command("rooms", usage="/rooms")
def list_rooms(ctx):
    """List the rooms with how many people are in each."""
    rooms = ctx.rooms()
    described = ", ".join(f"#{room.name} ({room.people})" for room in rooms)
    ctx.reply(f"{len(rooms)} room{'s' * (len(rooms) != 1)}: {described}")
