"""/uptime: the server's version, age and size."""
from commands import command


@command("uptime", aliases=("server",))
def uptime(ctx):
    """Show the server's version, when it started, who and what is here now, and the most people at once."""
    info = ctx.server_info()
    ctx.reply(f"pyChat {info.version}, up since {info.started} ({info.up}); {info.people} online in "
              f"{info.rooms} room(s) now; at most {info.most_people} at once; /search searches {info.search}.")
