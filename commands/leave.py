"""/leave: back to the default room."""
from commands import command


@command("leave", usage="/leave", aliases=("part",))
def leave_room(ctx):
    """Leave this room and go back to the lobby."""
    ctx.join(ctx.default_room)
