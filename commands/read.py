"""/read: say that you have read a room or a private conversation."""
from commands import command


@command("read", "[WHERE]")
def read(ctx, where):
    """Mark everything said in WHERE (a room, or a nickname; your current room without it) as read.

    The pyChat client sends it for you while you are at the terminal. Your
    other sessions are told, and what you have read is not shown to you again
    when you next sign in.
    """
    ctx.mark_read(where)
