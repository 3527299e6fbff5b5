"""/nick: change your nickname."""
from commands import command


@command("nick", "NEW")
def change_nick(ctx, new):
    """Change your nickname; the same rules apply as when you signed in."""
    ctx.rename(new)
